"""Stage checkpoints: DeepSpeed's engine checkpoint plus Strata's state, written atomically.

Layout under RUN_DIR/checkpoints/:

    s01-step000050/      a mid-stage checkpoint (stage 1, after 50 optimizer steps)
    s01-end/             the end of stage 1 (always kept)
    s02-step000020/ ...
    latest.json          the pointer: which tag to resume from; moved last

A save goes: every rank writes its DeepSpeed files under `.tmp-TAG/` plus its own RNG state;
rank 0 renames the folder to `TAG/`, then replaces `latest.json` (write a temp file, fsync,
os.replace). A crash at any instant therefore leaves `latest.json` naming a complete checkpoint:
a torn write is at worst a `.tmp-*` folder, removed by the next save. Only then are old
mid-stage tags pruned (keep the last K; stage ends are never pruned).

Strata's own state (stage, step, stream state, the carried state of the previous stage) travels
inside DeepSpeed's `client_state` under the key "strata", so it can never disagree with the
weights it was saved with. Each rank's RNG states go to `rng-rankNN.json` inside the tag.

Resuming on another world size: with ZeRO stage 0 the optimizer state lives in the single
model-states file and loads on any world size. ZeRO 1-3 partition it per rank, so the tag is first
converted with DeepSpeed's universal checkpoint (`ds_to_universal`, into `TAG-universal/`) and
loaded with `checkpoint.load_universal` -- see `needs_universal` and `convert_to_universal`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.distributed import any_rank, barrier
from pipeline.errors import ResumeError, StrataError
from pipeline.files import read_json, write_json_atomic
from pipeline.train.failures import checkpoint_fault

LATEST = "latest.json"
META = "strata.json"
_MID = re.compile(r"^s(\d+)-step(\d+)$")


def mid_tag(stage_index: int, step: int) -> str:
    return f"s{stage_index + 1:02d}-step{step:06d}"


def end_tag(stage_index: int) -> str:
    return f"s{stage_index + 1:02d}-end"


@dataclass(frozen=True)
class Pointer:
    """What a checkpoint holds, in words: also the content of latest.json and TAG/strata.json."""

    tag: str
    stage: int  # 0-based stage index
    step: int  # optimizer steps done in that stage
    stage_done: bool
    world_size: int
    zero_stage: int


@dataclass
class StageState:
    """Strata's state saved with every checkpoint: where in the stage training stands.

    It travels inside DeepSpeed's client_state as plain data (`as_dict`), so that it loads with
    torch.load(weights_only=True); the trainer works with this typed form.
    """

    stage: int  # 0-based stage index
    step: int  # optimizer steps done in the stage
    tokens: int  # tokens trained in the stage
    stream: dict  # the data stream's state after `step` steps (samples trained, cursors, mixer counts)
    carried: dict | None = None  # the stream state the stage started from: the previous stage's end

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> StageState:
        return cls(raw["stage"], raw["step"], raw["tokens"], raw["stream"], raw.get("carried"))


def _first_mismatch(message: str) -> str:
    lines = [ln.strip() for ln in message.splitlines() if "size mismatch" in ln or "key(s)" in ln]
    return (lines[0] if lines else message.splitlines()[0]).rstrip(".")


def weights_only_loads(engine: Any) -> None:
    """Make DeepSpeed's checkpoint engine load with torch.load(weights_only=True).

    DeepSpeed 0.19's TorchCheckpointEngine.load uses weights_only=False, i.e. full unpickling: a
    checkpoint folder could run arbitrary code. Every file of a plain (non-universal) load goes
    through `engine.checkpoint_engine.load` -- the model states and the ZeRO optimizer
    partitions -- so we replace that one method. The ZeRO optimizer state pickles three harmless
    DeepSpeed classes (a loss scaler, an enum, a named tuple), allowed explicitly below.
    Not covered (DeepSpeed calls torch.load itself, with weights_only=False): universal
    checkpoints (`ds_to_universal` and `load_universal`, used when resuming a ZeRO 1-3 run on
    another world size) and the ZeRO-3 weights-only load at a stage start (zero_to_fp32).
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if not isinstance(ckpt_engine, TorchCheckpointEngine):
        return  # another engine (e.g. Nebula, decoupled): leave it alone

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location=map_location, weights_only=True)

    ckpt_engine.load = load


# ---------------------------------------------------------------------------------------------
# RNG states: plain lists, so they survive JSON and torch.load(weights_only=True) alike.


def rng_state() -> dict:
    state = {
        "python": _listify(random.getstate()),
        "numpy": _listify(np.random.get_state()),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def start_stage_rng(seed: int, stage: int, rank: int, saved: dict | None) -> None:
    """Set the RNG states a stage's first step draws from (dropout masks; LoRA dropout included).

    A fresh stage: states that depend on (recipe seed, stage, rank) alone, not on what ran before in
    this process (an earlier stage, an evaluation), so it draws the same numbers whether the previous
    stage ended a second ago or in a killed run. A resumed stage: `saved`, the states its checkpoint
    held, set again here because building the stage's loader and objective may draw from them.
    """
    if saved is not None:
        set_rng_state(saved)
        return
    key = int.from_bytes(hashlib.sha256(f"strata-rng:{seed}:{stage}:{rank}".encode()).digest()[:8], "little")
    random.seed(key)
    np.random.seed(key % 2**32)
    torch.manual_seed(key)  # also seeds every CUDA device


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _listify(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return [_listify(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


# ---------------------------------------------------------------------------------------------


def _read_pointer(path: Path) -> Pointer:
    raw = read_json(path, "checkpoint pointer", error=ResumeError)
    try:
        return Pointer(**raw)
    except TypeError as e:
        raise ResumeError(f"{path}: unreadable checkpoint pointer ({e})") from None


# What torch's serializer (PyTorchStreamWriter, a C++ ofstream) raises when a write fails, e.g.
# on a full disk: a RuntimeError, not an OSError.
_TORCH_WRITE_FAILURES = ("basic_ios::clear", "iostream error", "file write failed", "unexpected pos",
                         "PytorchStreamWriter failed", "inline_container.cc")


def is_write_failure(e: BaseException) -> bool:
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITE_FAILURES))


def write_failure_text(e: BaseException) -> str:
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return f"the write failed, is the disk full? torch: {str(e).strip().splitlines()[0]}"


class StageCheckpoint:
    def __init__(self, folder: Path, keep: int, rank: int = 0, world_size: int = 1,
                 before_write: Callable[[], None] | None = None):
        self.folder = Path(folder)
        self.keep = keep
        self.rank = rank
        self.world_size = world_size
        self.before_write = before_write  # raises if this process no longer owns the run folder

    def latest(self) -> Pointer | None:
        """The checkpoint to resume from, or None for a fresh run."""
        path = self.folder / LATEST
        if not path.is_file():
            return None
        pointer = _read_pointer(path)
        if not (self.folder / pointer.tag).is_dir():
            raise ResumeError(f"{path}: points at {pointer.tag!r}, which is missing from {self.folder}")
        return pointer

    def meta(self, tag: str) -> Pointer:
        path = self.folder / tag / META
        if not path.is_file():
            raise ResumeError(f"{self.folder / tag}: not a complete Strata checkpoint (no {META})")
        return _read_pointer(path)

    def save(self, engine: Any, pointer: Pointer, state: dict) -> None:
        """Save on every rank (DeepSpeed requires all ranks); the pointer moves last, on rank 0."""
        tmp = f".tmp-{pointer.tag}"
        if self.before_write is not None:
            self.before_write()
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.folder / tmp, ignore_errors=True)  # a torn earlier attempt
        barrier()
        try:
            checkpoint_fault(pointer.tag, self.folder / tmp, before=True)  # test hook: a full disk for torch
            engine.save_checkpoint(str(self.folder), tag=tmp, client_state={"strata": state}, save_latest=False)
            (self.folder / tmp / f"rng-rank{self.rank:02d}.json").write_text(json.dumps(rng_state()))
            checkpoint_fault(pointer.tag, self.folder / tmp)  # test hook: die or run out of disk half way
            failed = None
        except OSError as e:  # out of disk, quota, a vanished mount: the previous checkpoint stays
            failed = e
        except RuntimeError as e:  # torch's C++ writer reports a failed write as a RuntimeError
            if not is_write_failure(e):
                raise
            failed = e
        if any_rank(failed is not None):
            self._abandon(tmp, pointer.tag, failed)
        barrier()
        if self.rank == 0:
            write_json_atomic(self.folder / tmp / META, asdict(pointer))
            final = self.folder / pointer.tag
            if final.exists():  # re-saving a tag after a resume (e.g. the same mid-stage step)
                shutil.rmtree(final)
            # a universal copy of an earlier save under this tag would be stale
            shutil.rmtree(final.with_name(final.name + "-universal"), ignore_errors=True)
            os.replace(self.folder / tmp, final)
            write_json_atomic(self.folder / LATEST, asdict(pointer))
            self._prune()
        barrier()

    def _abandon(self, tmp: str, tag: str, error: OSError | RuntimeError | None) -> None:
        """A failed write on some rank: every rank gets here, the torn folder goes, the pointer stays."""
        barrier()
        if self.rank == 0:
            shutil.rmtree(self.folder / tmp, ignore_errors=True)
        barrier()
        previous = self.latest()
        why = write_failure_text(error) if error is not None else "failed on another rank"
        kept = f"the last good checkpoint {previous.tag} is intact" if previous else "no earlier checkpoint exists"
        raise StrataError(f"{self.folder / tag}: cannot write the checkpoint ({why}); {kept}; "
                          "free disk space and run the same command to resume")

    def load(self, engine: Any, tag: str, module_only: bool = False, universal: bool = False) -> dict:
        """Load weights (and optimizer unless module_only) from `tag`; returns Strata's state."""
        load_tag = f"{tag}-universal" if universal else tag
        if module_only and engine.zero_optimization_partition_weights():
            # DeepSpeed 0.19 consolidates ZeRO-3 weights for a weights-only load through
            # zero_to_fp32 *without* passing the tag, so it reads the tag from DeepSpeed's own
            # `latest` file. Strata ignores that file otherwise; point it at the tag we load.
            if self.rank == 0:
                (self.folder / ".latest.tmp").write_text(load_tag)
                os.replace(self.folder / ".latest.tmp", self.folder / "latest")
            barrier()
        weights_only_loads(engine)
        try:
            path, client = engine.load_checkpoint(
                str(self.folder), tag=load_tag, load_module_only=module_only,
                load_optimizer_states=not module_only, load_lr_scheduler_states=False)
        except RuntimeError as e:  # load_state_dict: another architecture or width
            if "size mismatch" not in str(e) and "key(s) in state_dict" not in str(e):
                raise
            raise ResumeError(f"{self.folder / load_tag}: saved from a different model than the recipe builds "
                              f"({_first_mismatch(str(e))}); use the recipe this run started with "
                              "or a new --run-dir") from None
        except pickle.UnpicklingError as e:
            raise ResumeError(f"{self.folder / load_tag}: refused to load, the checkpoint holds objects other "
                              f"than tensors and plain data ({str(e).splitlines()[-1].strip()})") from None
        if path is None or client is None or "strata" not in client:
            raise ResumeError(f"{self.folder / load_tag}: DeepSpeed could not load this checkpoint")
        if not module_only:
            own = self.folder / tag / f"rng-rank{self.rank:02d}.json"
            rng = own if own.is_file() else self.folder / tag / "rng-rank00.json"
            if rng.is_file():
                set_rng_state(json.loads(rng.read_text()))
        return client["strata"]

    def strata_state(self, tag: str) -> dict:
        """Strata's state saved with `tag`, read without an engine (the model may have grown since).

        DeepSpeed stores the client state in every model-states file of the tag (one file under
        ZeRO 0-2, one per rank under ZeRO-3); any of them will do. mmap keeps the weights unread.
        """
        files = sorted((self.folder / tag).glob("*model_states.pt"))
        if not files:
            raise ResumeError(f"{self.folder / tag}: no DeepSpeed model-states file")
        try:  # weights_only: a checkpoint folder must not be able to run code
            client = torch.load(files[0], map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, OSError) as e:
            raise ResumeError(f"{files[0]}: cannot read this checkpoint ({str(e).splitlines()[0]})") from None
        if "strata" not in client:
            raise ResumeError(f"{files[0]}: no Strata state in this checkpoint")
        return client["strata"]

    # -----------------------------------------------------------------------------------------
    def needs_universal(self, tag: str, loads_optimizer: bool) -> bool:
        """A ZeRO-partitioned optimizer state saved on another world size cannot load directly."""
        meta = self.meta(tag)
        return loads_optimizer and meta.zero_stage > 0 and meta.world_size != self.world_size

    def convert_to_universal(self, tag: str) -> None:
        """Rank 0 runs DeepSpeed's ds_to_universal on `tag` once; every rank waits for it."""
        out = self.folder / f"{tag}-universal"
        if self.rank == 0 and not out.is_dir():
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            tmp = self.folder / f".tmp-{tag}-universal"
            shutil.rmtree(tmp, ignore_errors=True)
            args = _UniversalArgs(input_folder=str(self.folder / tag), output_folder=str(tmp))
            ds_to_universal(args)
            # ds_to_universal copies the model-states files; keep our meta and RNG next to them.
            for f in (self.folder / tag).glob("*.json"):
                shutil.copyfile(f, tmp / f.name)
            os.replace(tmp, out)
        barrier()

    def _prune(self) -> None:
        """Keep the newest `keep` mid-stage tags and every stage end; drop stale universal copies."""
        mids = []
        for p in self.folder.iterdir():
            m = _MID.match(p.name)
            if m and p.is_dir():
                mids.append(((int(m.group(1)), int(m.group(2))), p))
        mids.sort()
        for _, p in mids[:-self.keep]:
            shutil.rmtree(p, ignore_errors=True)
            shutil.rmtree(p.with_name(p.name + "-universal"), ignore_errors=True)
        for p in self.folder.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


@dataclass
class _UniversalArgs:
    """The argparse namespace that deepspeed.checkpoint.ds_to_universal.main expects."""

    input_folder: str
    output_folder: str
    num_extract_workers: int = 1
    num_merge_workers: int = 1
    keep_temp_folder: bool = False
    strict: bool = True
    inject_missing_state: bool = True  # Strata does not add universal_checkpoint_info itself
