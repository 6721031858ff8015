"""The trainer: carry a model through the recipe's stages on DeepSpeed, resumably.

Read top to bottom: `train()` decides where to start from the checkpoint pointer, then runs each
remaining stage with `train_stage()`, which builds a fresh DeepSpeed engine (so the optimizer
state is reset and the LR re-warms), loads the weights it starts from, and loops `train_step()`.

Resume is not advance. Starting stage k > 0 always goes through the same code path, whether the
previous stage ended a second ago in this process or in a run that was killed: build the model,
build the engine, load the previous stage's end checkpoint (weights only, unless the stage sets
`reset_optimizer: false`). That is what makes a resumed run bit-identical to an uninterrupted
one on CPU in fp32 (tests/train/test_trainer.py checks it).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.data.context import StageContext
from pipeline.distributed import Dist, barrier, compute_dtype, join, log
from pipeline.errors import StrataError
from pipeline.files import write_text_atomic
from pipeline.model.expand import starts_from_export
from pipeline.model.runtime import apply_training_options
from pipeline.model.trainable import optimizer_groups
from pipeline.recipe.plan import build_plan, grad_accum, tokens_per_step
from pipeline.recipe.schedule import StageSchedule
from pipeline.recipe.spec import Recipe
from pipeline.train.checkpoint import (
    Pointer,
    StageCheckpoint,
    StageState,
    end_tag,
    mid_tag,
    rng_state,
    start_stage_rng,
)
from pipeline.train.failures import StepGuard, fault_at
from pipeline.train.objectives import Objective, stage_objective
from pipeline.train.ownership import RunOwner, watch_launcher
from pipeline.train.run_folder import (
    METRICS,
    check_resumable,
    export_dir,
    open_run,
    read_manifest,
    read_metrics,
    save_manifest,
    stage_checksums,
    stage_folder,
    step_offsets,
)
from pipeline.train.step import Step
from pipeline.train.throughput import Throughput

LOG = log(__name__)


def init_distributed() -> Dist:
    """Join torchrun's process group, or make a group of one (DeepSpeed's engine needs one)."""
    return join(deepspeed_engine=True)


def deepspeed_config(recipe: Recipe, world_size: int, bf16: bool) -> dict:
    """DeepSpeed's config from the recipe; batch arithmetic is checked in the recipe's terms first."""
    micro, global_batch = recipe.batch.micro, recipe.batch.global_
    accum = grad_accum(recipe, world_size)  # refuses a global batch that does not divide
    extra = dict(recipe.deepspeed.config)
    zero = {"stage": recipe.zero_stage, **extra.pop("zero_optimization", {})}
    config = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": recipe.train.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW is not on DeepSpeed's tested list
        "steps_per_print": 1 << 30,  # Strata logs every step itself
        "wall_clock_breakdown": False,
    }
    config.update(extra)  # anything else DeepSpeed accepts passes through unchanged
    return config


class StageEvaluation(Protocol):
    """What the trainer asks of evaluation (pipeline/evaluate/heldout.py's RunEvaluation; the
    train command hands it in, so training never imports the evaluation layer above it)."""

    def fill_in(self, tokenizer: Any) -> Any: ...  # evaluate the initial model and finished stages lacking results

    def evaluate(self, stage: str, model: torch.nn.Module) -> Any: ...  # after a stage, on every rank

    def evaluate_unmerged(self, stage: str, model: torch.nn.Module) -> Any: ...  # a merging stage, before its merge


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    seconds: float
    data_seconds: float = 0.0  # of which waiting for the stream
    extra: dict = field(default_factory=dict)  # more per-step metrics (RHO-1 selection)

@dataclass(frozen=True)
class OpenRun:
    """A run folder opened for training: this process's place in the group and the run's lock."""

    dist: Dist
    owner: RunOwner


@contextmanager
def open_training(recipe: Recipe, run_dir: Path) -> Iterator[OpenRun]:
    """Open a run for training around a `Trainer`: the checks every rank makes before any
    collective, the run folder's lock (pipeline/train/ownership.py: rank 0 locks it before joining,
    so every rank can read the run id once joined), the launcher watch (orphaned workers stop by
    themselves) and the process group. The lock is released when the block ends."""
    from pipeline.train.sinks import check_sinks

    check_sinks(recipe)  # on every rank, before any collective
    grad_accum(recipe, int(os.environ.get("WORLD_SIZE", 1)))  # a batch that does not divide: before any work
    owner = RunOwner(Path(run_dir))
    if int(os.environ.get("RANK", 0)) == 0:
        owner.claim()
    try:
        watch_launcher()
        dist = init_distributed()
        owner.learn()
        yield OpenRun(dist, owner)
    finally:
        owner.release()


class Trainer:
    """Carries the recipe's model through its stages in an opened run (`open_training`); building
    one has no side effect beyond loading the tokenizer, so a test can build it in-process."""

    def __init__(self, recipe: Recipe, run_dir: Path, run: OpenRun, tokenizer: Any = None,
                 evaluation: Callable[[Trainer], StageEvaluation] | None = None):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.owner, self.dist = run.owner, run.dist
        if tokenizer is None:
            from pipeline.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(recipe.tokenizer)
        self.tokenizer = tokenizer
        self.dtype = compute_dtype(recipe.train.dtype, self.dist.device)  # the one bf16 decision
        self.bf16 = self.dtype == torch.bfloat16
        self.zero_stage = recipe.zero_stage
        self.ckpt = StageCheckpoint(self.run_dir / "checkpoints", recipe.checkpoint.keep,
                                    self.dist.rank, self.dist.world_size, before_write=self.owner.check)
        self.is_main = self.dist.rank == 0
        self._metrics = None
        self._tb = None
        self._wandb = None
        self._step_offset = 0  # global steps of the stages before the current one
        self._make_evaluation = evaluation
        self.evaluation: StageEvaluation | None = None  # made when train() starts (the sinks are open then)
        self.throughput: Throughput | None = None  # FLOPs per token of the stage's model (set with its engine)
        self.step = Step(Objective())  # the stage's step: its objective's terms and RHO-1's mask (step.py)
        self.guard = StepGuard(recipe.train.max_bad_steps, self.dist.rank, self.dist.world_size)  # signals, NaN

    # -------------------------------------------------------------------------------------------
    def train(self) -> dict[str, float | None]:
        """Run or resume every stage; returns each stage's final loss as run.json records it."""
        pointer = self.ckpt.latest()
        check_resumable(self.run_dir, self.recipe, pointer)  # every rank checks, so every rank refuses
        barrier()
        if self.is_main:
            open_run(self.run_dir, self.recipe, self.dist.world_size)
            if pointer is not None and pointer.stage_done:  # repair run.json after a crash between writes
                unrecorded = not read_manifest(self.run_dir).stages[pointer.stage].files  # never re-bless changed files
                self._mark(pointer.stage, status="done", checkpoint=pointer.tag, **({"files": stage_checksums(
                    self.run_dir, pointer.stage, self.recipe.stages[pointer.stage].name)} if unrecorded else {}))
        barrier()
        from pipeline.data.shards import prepared_tokens

        self.plans = build_plan(self.recipe, prepared_tokens(self.recipe))  # once; handed down to each stage's stream
        first = 0 if pointer is None else pointer.stage + (1 if pointer.stage_done else 0)
        resume = pointer if pointer is not None and not pointer.stage_done else None
        if self.is_main:
            self._open_metrics(first, resume.step if resume else 0)
        if self._make_evaluation is not None:
            self.evaluation = self._make_evaluation(self)
            self.evaluation.fill_in(self.tokenizer)  # the initial model, and finished stages that lack results
        for index in range(first, len(self.recipe.stages)):
            self.train_stage(index, resume if index == first else None)
        if first >= len(self.recipe.stages):
            LOG.info(f"all {len(self.recipe.stages)} stage(s) of {self.run_dir} are finished; nothing to do")
        return {r.name: r.final_loss for r in read_manifest(self.run_dir).stages}

    def train_stage(self, index: int, resume: Pointer | None) -> None:
        """Build the stage (its context, engine, stream and step), then loop its steps."""
        from pipeline.data.loader import make_loader

        ctx, engine, optimizer, state = self._open_stage(index, resume)
        saved_rng = None if ctx.fresh else rng_state()  # what the load restored, set again before step 1
        carried = None if state is None else state.stream if ctx.fresh else state.carried
        stream = make_loader(ctx, carried)
        step, tokens = (0, 0) if ctx.fresh else (state.step, state.tokens)
        if not ctx.fresh:
            stream.load_state_dict(state.stream)
        self.step = self._stage_step(ctx, engine, stream)
        self.guard.start_stage(index, step, engine)
        if self.is_main:
            self._announce(ctx, stream, step)
        schedule = StageSchedule.from_recipe(ctx.stage.schedule, stream.steps)
        start_stage_rng(self.recipe.seed, index, self.dist.rank, saved_rng)  # seeded per stage, or the saved states
        bar = self._progress(index, stream.steps, step)
        per_step, every, result = tokens_per_step(self.recipe), self.recipe.checkpoint.every, None
        while step < stream.steps:
            result = self.train_step(engine, optimizer, stream, schedule.lr(step))
            step += 1
            tokens += per_step
            if self.is_main:
                bar.update(1)
                if step % self.recipe.train.log_every == 0 or step == stream.steps:
                    self._log(bar, ctx, (step, stream.steps, tokens), result, schedule.lr(step - 1))
            self.guard.after_step(index, ctx.stage.name, step)  # counts a skipped (NaN) step; stops after too many
            now = StageState(index, step, tokens, stream.state_dict(), carried)
            if step == stream.steps:
                self._finish_stage(engine, ctx, now, result)
            elif (every and step % every == 0) or self.guard.stop:  # also on SIGTERM/SIGUSR1
                pointer = Pointer(mid_tag(index, step), index, step, False, self.dist.world_size, self.zero_stage)
                self.ckpt.save(engine, pointer, now.as_dict())
            self._maybe_kill(index, step)
            self.guard.stop_if_requested(index, ctx.stage.name, step, self.ckpt)
        bar.close()
        # Free this stage's engine before the next one is built (the next stage starts fresh).
        stream.close()  # DataLoader workers end with the stage
        del engine, optimizer, stream
        self.step = Step(Objective())
        gc.collect()

    def _open_stage(self, index: int, resume: Pointer | None) -> tuple[StageContext, Any, Any, StageState | None]:
        """The stage's context, its engine with the weights it starts from, and the Strata state
        of the checkpoint it starts from (None for the first stage's start)."""
        stage, fresh = self.recipe.stages[index], resume is None
        # What the stage starts from: its own mid-stage checkpoint, or the previous stage's end.
        source_tag = resume.tag if resume else (end_tag(index - 1) if index > 0 else None)
        module_only = fresh and stage.reset_optimizer
        # A stage that expands the model (or names a new tokenizer) starts from the previous stage's
        # export, grown before its engine is built; the end checkpoint then gives only Strata's
        # state (pipeline/model/expand.py), so it never needs a universal conversion.
        grow = fresh and (stage.expand is not None or self._vocabulary_grows(index)
                          or starts_from_export(self.recipe, index))  # adapters: pipeline/model/adapters.py
        universal = (not grow and source_tag is not None
                     and self.ckpt.needs_universal(source_tag, not module_only))
        if universal:
            self.ckpt.convert_to_universal(source_tag)
        if stage.replay is not None and stage.replay.generate is not None:  # before the engine: one model at a time
            from pipeline.train.generation import ensure_generated

            ensure_generated(self.recipe, index, self.run_dir)
        engine, optimizer = self._build_engine(universal, index, grow)
        state = None
        if source_tag is not None:
            state = StageState.from_dict(self.ckpt.strata_state(source_tag) if grow else
                                         self.ckpt.load(engine, source_tag, module_only=module_only, universal=universal))
        zero3 = deepspeed_config(self.recipe, self.dist.world_size, self.bf16) if self.zero_stage == 3 else None
        ctx = StageContext(self.recipe, index, self.plans[index], self._tokenizer_at(index), self.dist, self.dtype,
                           self.run_dir, zero3, source_tag, fresh)
        return ctx, engine, optimizer, state

    def _stage_step(self, ctx: StageContext, engine: Any, stream: Any) -> Step:
        """The stage's one step: its objective's terms and, with `selection:`, RHO-1's mask."""
        selection = None
        if ctx.stage.selection is not None:
            from pipeline.train.selection import Rho1

            selection = Rho1.for_stage(ctx, stream)
        objective, notes = stage_objective(ctx, engine.module)
        for note in notes:
            LOG.info(f"stage {ctx.index + 1}: {note}")
        return Step(objective, selection, ctx.world_size)

    def _announce(self, ctx: StageContext, stream: Any, step: int) -> None:
        """run.json says the stage runs; the log says how it starts (rank 0)."""
        index, stage = ctx.index, ctx.stage
        self._mark(index, status="running", steps=stream.steps)
        # global step of this stage's step 0, for TensorBoard/W&B: read once, not every step
        self._step_offset = step_offsets([r.steps for r in read_manifest(self.run_dir).stages])[index]
        source = ctx.resume_from
        how = f"resuming at step {step} from {source}" if not ctx.fresh else (
            f"starting from {source}" if source else "starting from the initial model")
        LOG.info(f"stage {index + 1}/{len(self.recipe.stages)} {stage.name!r}: {stream.steps} steps, "
                 f"{stream.grad_accum} micro-batch(es) of {self.recipe.batch.micro} per step per rank, "
                 f"{self.dist.world_size} rank(s); {how}")
        for name, change in (stream.retokenized.items() if ctx.fresh else ()):
            LOG.info(f"stage {index + 1}: source {name!r} re-tokenized; its cursor {change['cursor'][0]} -> "
                     f"{change['cursor'][1]} windows (the same share of the new token stream)")

    def train_step(self, engine: Any, optimizer: torch.optim.Optimizer, stream: Any, lr: float) -> StepResult:
        """One optimizer step: grad_accum micro-batches (pipeline/train/step.py: CE, or CE over
        RHO-1's selected tokens, + KL + penalty), then DeepSpeed's step (clip + AdamW)."""
        start = time.perf_counter()
        # ZeRO keeps our AdamW as its inner optimizer and steps it, so its param_groups carry the LR.
        for group in optimizer.param_groups:
            group["lr"] = lr
        out = self.step(engine, stream, self.dist.device, lambda total: self.guard.step(engine, optimizer, total))
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else None
        return StepResult(out.loss, norm, time.perf_counter() - start, out.data_seconds, out.extra)

    @property
    def sinks(self) -> tuple[Any, Any]:
        """(TensorBoard writer, W&B run), each None when off: evaluation logs its scalars there too."""
        return self._tb, self._wandb

    def _tokenizer_at(self, index: int) -> Any:
        """The tokenizer in force at stage `index` (a stage `tokenizer:`, else the recipe's)."""
        path = self.recipe.tokenizer_at(index)
        if path == self.recipe.tokenizer:
            return self.tokenizer
        from pipeline.data.tokenizer import cached_tokenizer

        return cached_tokenizer(path)

    def _vocabulary_grows(self, index: int) -> bool:
        """Stage `index` starts with a new tokenizer, so the previous stage's checkpoint has fewer rows."""
        return index > 0 and self.recipe.tokenizer_at(index) != self.recipe.tokenizer_at(index - 1)

    def _start_path(self, index: int) -> Path | None:
        """The previous stage's export, which a growing (or adapter) stage starts from."""
        prev = self.recipe.stages[index - 1] if index > 0 else None
        return stage_folder(self.run_dir, index - 1, prev.name) if prev is not None else None  # checksums checked

    # -------------------------------------------------------------------------------------------
    def _build_engine(self, universal: bool, index: int, grow: bool = False) -> tuple[Any, torch.optim.Optimizer]:
        import deepspeed

        from pipeline.model.expand import build_stage_model

        # Stage `index` trains the base architecture grown by every expansion up to it; frozen
        # parameters (expand.freeze_old) stay out of the optimizer.
        start = self._start_path(index) if grow else None
        model, note = build_stage_model(self.recipe, index, self.tokenizer.vocab_size, self.tokenizer.eos_id, start)
        if note:
            LOG.info(f"stage {index + 1}: {note}")
        train = self.recipe.train
        options = apply_training_options(model, train, self.dist.device)  # attention, checkpointing, compile
        self.throughput = Throughput.for_model(model, self.recipe.seq_len, self.dist.device, self.dist.world_size,
                                               train.peak_tflops)
        LOG.info(f"stage {index + 1}: {', '.join(options)}; "
                 f"{self.throughput.flops_per_token / 1e9:.3f} GFLOP per token")
        # No weight decay on norms and biases (the usual GPT recipe); frozen parameters stay out.
        groups = optimizer_groups(model, train.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(train.betas), eps=train.eps, foreach=False)
        config = deepspeed_config(self.recipe, self.dist.world_size, self.bf16)
        if universal:
            config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                               dist_init_required=False)
        return engine, optimizer

    def _finish_stage(self, engine: Any, ctx: StageContext, state: StageState, result: StepResult | None) -> None:
        """Export, then the stage-end checkpoint (its pointer says 'done'), then run.json."""
        from pipeline.model.export import export_dtype, export_hf

        index, stage = ctx.index, ctx.stage
        out = export_dir(self.run_dir, index, stage.name)
        if self.is_main:
            out.parent.mkdir(parents=True, exist_ok=True)
        barrier()
        unmerged = out.with_name("hf-unmerged") if stage.merge is not None else out
        # the stage's tokenizer; an adapter stage exports merged weights and keeps the adapter beside them
        adapter = (out.parent / "adapter", self._start_path(index)) if stage.adapter is not None else None
        dtype = export_dtype(self.recipe.export.dtype, self.dtype)
        export_hf(engine, ctx.tokenizer, unmerged, self.dist.rank, adapter, dtype)
        if stage.merge is not None:  # the export and the next stage's start are the merge (train/merging.py)
            from pipeline.train.merging import merge_stage_end

            if self.evaluation is not None:  # the trained weights too, so the report shows what the merge bought
                self.evaluation.evaluate_unmerged(stage.name, engine.module)

            note = merge_stage_end(ctx, unmerged, out, engine.module, dtype)
            LOG.info(f"stage {index + 1}: {note}")
        pointer = Pointer(end_tag(index), index, state.step, True, self.dist.world_size, self.zero_stage)
        self.ckpt.save(engine, pointer, state.as_dict())
        if self.is_main:
            self._mark(index, status="done", checkpoint=pointer.tag, export=str(out.relative_to(self.run_dir)),
                       final_loss=result.loss if result else None,
                       files=stage_checksums(self.run_dir, index, stage.name))  # checked when read
            LOG.info(f"stage {index + 1} {stage.name!r} done: checkpoint {self.ckpt.folder / pointer.tag}, "
                     f"export {out}")
        if self.evaluation is not None:  # held-out loss per domain after the stage (all ranks)
            self.evaluation.evaluate(stage.name, engine.module)

    def _mark(self, index: int, **fields: Any) -> None:
        manifest = read_manifest(self.run_dir)
        for key, value in fields.items():
            setattr(manifest.stages[index], key, value)
        save_manifest(self.run_dir, manifest)

    def _open_metrics(self, stage: int, step: int) -> None:
        """Append to metrics.jsonl, first dropping lines past the resume point (they will be re-run)."""
        path = self.run_dir / METRICS
        if path.exists():  # (a line torn by the kill that interrupted the run is dropped: its step is re-run)
            keep = [json.dumps(row) + "\n" for row in read_metrics(self.run_dir).rows
                    if (row["stage"], row["step"]) <= (stage, step)]
            write_text_atomic(path, "".join(keep))
        self._metrics = open(path, "a")
        if self.recipe.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise StrataError("train.tensorboard is set but tensorboard is not installed (pip install tensorboard)") from None
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        from pipeline.train.sinks import open_wandb

        self._wandb = open_wandb(self.recipe, self.run_dir)

    def _log(self, bar: Any, ctx: StageContext, where: tuple[int, int, int], r: StepResult, lr: float) -> None:
        """One line to the log and one row to metrics.jsonl; `where` is (step, steps, tokens)."""
        (step, steps, tokens), index, name = where, ctx.index, ctx.stage.name
        tps = tokens_per_step(self.recipe) / r.seconds if r.seconds > 0 else 0.0
        norm = f"{r.grad_norm:.3f}" if r.grad_norm is not None else "n/a"
        speed = self.throughput.metrics(tps)  # per device: tokens/s, model TFLOP/s, MFU, peak memory
        bar.write(f"stage {index + 1} {name} | step {step}/{steps} | tokens {tokens:,} | loss {r.loss:.4f} | "
                  f"lr {lr:.3e} | grad_norm {norm} | {tps:,.0f} tok/s | {Throughput.describe(speed)}")
        record = {"stage": index, "stage_name": name, "step": step, "tokens": tokens, "loss": r.loss, "lr": lr,
                  "grad_norm": r.grad_norm, "tokens_per_s": tps, **speed, "step_s": r.seconds,
                  "data_s": r.data_seconds, "time": time.time(), **r.extra}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._tb is not None or self._wandb is not None:
            from pipeline.train.sinks import log_scalars

            global_step = self._step_offset + step
            log_scalars(self._tb, self._wandb, {f"{key}/{name}" if key == "loss" else key: record[key]
                                                for key in ("loss", "lr", "grad_norm", "tokens_per_s")}, global_step)

    def _progress(self, index: int, steps: int, initial: int) -> Any:
        from pipeline.data.progress import progress_bar  # tqdm on a terminal, plain lines with ETA elsewhere

        name = self.recipe.stages[index].name
        return progress_bar(steps, f"stage {index + 1}/{len(self.recipe.stages)} {name}", "step", initial,
                            disable=not self.is_main)

    def _maybe_kill(self, index: int, step: int) -> None:
        """Test faults after step N: `kill@S:N` dies with SIGKILL (no cleanup, like a lost node);
        `hold@S:N` waits until the file named by STRATA_TEST_RELEASE exists (a run held mid-stage)."""
        if fault_at("hold", index + 1, step):
            release = Path(os.environ["STRATA_TEST_RELEASE"])
            deadline = time.monotonic() + 600
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        if fault_at("kill", index + 1, step):
            barrier()  # every rank has finished writing whatever this step writes
            if self._metrics is not None:
                self._metrics.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def close(self) -> None:
        """Close the trainer's files and sinks (the run's lock is `open_training`'s)."""
        self.guard.close()
        if self._metrics is not None:
            self._metrics.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
