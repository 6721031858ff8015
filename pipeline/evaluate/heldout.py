"""Per-domain evaluation: held-out loss, perplexity and next-token accuracy, after every stage.

Domains. Every source of the recipe is a domain, scored on its held-out split (the documents
`strata prepare` set aside by hash, never trained on); every `eval:` set is a domain scored on all
its documents. Later stages' domains are scored too: that is the forward-transfer baseline. The
`pretraining:` sources are domains learned before stage 0 (stage index -1): old from the start,
so FGT/BWT measure how much of the base model's general data each stage forgot.

Windows. A domain's documents, in shard order, each followed by EOS, form one token stream that is
cut into windows of seq_len inputs and their next tokens (the packer's layout, so documents do not
attend to each other); the last window is padded and its padding ignored. Every token but the
first is scored exactly once. `train.eval_tokens` caps the tokens scored per domain.

Ranks. Windows are grouped into batches of `batch.micro`; batch b goes to rank b % W. Each rank
writes per-window sums (loss, correct, tokens) in float64 into a zero matrix [windows, 3]; one
all-reduce (sum) fills it in, and every rank adds the rows up in window order. A batch holds the
same windows whatever W is, and adding zeros is exact, so 1 and N processes give identical numbers.
Under ZeRO-3 parameters are gathered collectively during the forward pass, so every rank runs the
same number of them: a rank with one batch fewer runs a batch again and discards it.

Tokenizers. After a stage with a new tokenizer (`tokenizer:` in the recipe), every domain is
scored in the shards of the tokenizer in force at that stage (what the model now reads); the
initial model is scored in the recipe's. A loss per token then counts slightly different tokens
before and after the change (for an extension, only text the new pieces cover is split
differently), which the forgetting matrix of such a run should be read with.

Results go to RUN_DIR/eval.json (see `EvalFile`): per evaluation ("init" for the initial model,
then each stage's name) and domain, together with a fingerprint of the data scored. An evaluation
whose results exist for the same data is never run again; `strata eval RUN_DIR` fills in what is
missing by loading each finished stage's Hugging Face export.

Merging. A stage with `merge:` exports its trained weights to stages/NN-NAME/hf-unmerged/ and
continues from the merge (pipeline/train/merging.py). The evaluation after such a stage, and every
CL metric, is of the merged model (the one the run carries on with); the unmerged export is scored
on the same domains beside it, into `results_unmerged` / `loss_unmerged[stage][domain]`, so the
report can show what the merge bought.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.data.packer import position_ids
from pipeline.data.shards import PreparedSource, load_shard
from pipeline.distributed import log
from pipeline.errors import StrataError
from pipeline.evaluate.decontaminate import record_contamination
from pipeline.evaluate.metrics import MEASURES, cl_metrics
from pipeline.files import read_json, update_json_locked
from pipeline.model.loss import token_stats
from pipeline.recipe.spec import PRETRAINING, Recipe
from pipeline.train.run_folder import read_manifest, stage_folder

EVAL_JSON = "eval.json"
UNMERGED = "hf-unmerged"  # a merging stage's trained weights before its merge (train/merging.py)
INIT = "init"  # the evaluation of the initial model, before stage 0
VERSION = 1
WHAT, FIX = "evaluation results", "delete it and run `strata eval`"  # how read errors of eval.json read
LOG = log(__name__)


@dataclass(frozen=True)
class Domain:
    name: str
    stage: int | None  # index of the stage whose own sources include it; -1 for `pretraining:`; None for `eval:`
    splits: tuple[str, ...]  # the shard splits scored: ("heldout",), or every split of an eval set


def recipe_domains(recipe: Recipe) -> list[Domain]:
    domains = [Domain(src.name, -1, ("heldout",)) for src in recipe.pretraining]
    domains += [Domain(src.name, i, ("heldout",)) for i, stage in enumerate(recipe.stages) for src in stage.sources]
    return domains + [Domain(src.name, None, ("train", "heldout")) for src in recipe.eval]


def _domain_entry(recipe: Recipe, d: Domain, data: DomainData) -> dict:
    """A domain as eval.json lists it: its stage's name ("pretraining" before stage 0) and kind."""
    kind = "eval" if d.stage is None else PRETRAINING if d.stage < 0 else "heldout"
    stage = recipe.stages[d.stage].name if kind == "heldout" else PRETRAINING if kind == PRETRAINING else None
    return {"name": d.name, "stage": stage, "stage_index": d.stage, "kind": kind, "tokens": len(data.tokens) - 1}


@dataclass
class DomainData:
    tokens: np.ndarray  # the scored stream: documents, each followed by EOS
    eos_id: int
    fingerprint: str  # of the shards, the cap and seq_len: results on other data are not reused


def domain_data(recipe: Recipe, domain: Domain, tokenizer: str | None = None) -> DomainData | None:
    """The token stream of a domain under `tokenizer` (default the recipe's), or None when it has
    nothing to score (e.g. data.heldout = 0)."""
    prepared = PreparedSource.read(recipe, domain.name, tokenizer)  # its manifest, read once
    eos = int(prepared.manifest["tokenizer"]["eos_id"])
    pieces, checksums = [], []
    for split in domain.splits:
        for path, meta in prepared.shards(split):
            values, offsets = load_shard(path, meta["sha256"])
            pieces.append(np.insert(values.astype(np.int64), offsets[1:], eos))  # EOS after each document
            checksums.append(meta["sha256"])
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    cap = recipe.train.eval_tokens
    if cap is not None:
        stream = stream[:cap + 1]
    if len(stream) < 2:
        return None
    blob = json.dumps([domain.splits, checksums, cap, recipe.seq_len]).encode()
    return DomainData(stream, eos, hashlib.sha256(blob).hexdigest()[:16])


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _batch(data: DomainData, seq_len: int, first: int, count: int) -> dict[str, torch.Tensor]:
    """Windows first .. first+count-1 of the stream: inputs, labels (-100 past the end), positions."""
    stream, n = data.tokens, len(data.tokens)
    starts = (first + np.arange(count)) * seq_len
    index = starts[:, None] + np.arange(seq_len + 1)
    windows = np.where(index < n, stream[np.minimum(index, n - 1)], data.eos_id)
    inputs, labels = windows[:, :-1], windows[:, 1:].copy()
    labels[index[:, 1:] >= n] = -100
    # The EOS padding past the stream's end is one document (never scored), not one per token: a
    # prompt-tuned model runs each document as a row of its own (pipeline/model/documents.py).
    past = index[:, :-1] >= n
    positions = np.where(past, np.arange(seq_len) - past.argmax(1)[:, None], position_ids(inputs, data.eos_id))
    return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(positions)}


@torch.no_grad()
def evaluate_domain(model: torch.nn.Module, data: DomainData, seq_len: int, micro: int,
                    device: torch.device | str = "cpu", desc: str | None = None) -> dict[str, float]:
    """Mean token loss, perplexity and next-token accuracy of `model` on one domain (all ranks call it).
    `desc`: the label of rank 0's progress bar; None: no bar."""
    from pipeline.data.progress import progress_bar  # tqdm on a terminal, plain lines elsewhere

    rank, world = _rank_world()
    windows = math.ceil((len(data.tokens) - 1) / seq_len)
    batches = math.ceil(windows / micro)
    stats = torch.zeros(windows, 3, dtype=torch.float64, device=device)
    rounds = math.ceil(batches / world)
    was_training = model.training
    model.eval()
    bar = progress_bar(rounds, desc or "", "batch", disable=desc is None or rank != 0, leave=False)
    for r in range(rounds):
        b = r * world + rank
        real = b < batches
        first = (b if real else rank % batches) * micro  # a spare forward pass keeps ZeRO-3 ranks in step
        batch = {k: v.to(device) for k, v in _batch(data, seq_len, first, min(micro, windows - first)).items()}
        loss, hit = token_stats(model, batch)  # head + loss per chunk of tokens (pipeline/model/loss.py)
        labels = batch["labels"]
        valid = labels != -100
        if real:
            correct = (hit > 0) & valid
            stats[first:first + len(labels), 0] = loss.double().sum(1)
            stats[first:first + len(labels), 1] = correct.sum(1).double()
            stats[first:first + len(labels), 2] = valid.sum(1).double()
        bar.update(1)
    bar.close()
    model.train(was_training)
    if world > 1:
        dist.all_reduce(stats)
    loss_sum, correct, tokens = (float(v) for v in stats.sum(0).cpu())
    mean = loss_sum / tokens
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "accuracy": correct / tokens,
            "tokens": int(tokens)}


# ------------------------------------------------------------------------------------------------
# eval.json


class EvalFile:
    """RUN_DIR/eval.json: results per evaluation and domain, the matrices and the CL metrics.

    Layout (docs/evaluation.md): {"version", "recipe", "evaluations": [names in run order],
    "domains": [{"name", "stage", "stage_index", "kind", "tokens"}], "results": {evaluation:
    {domain: {"loss", "perplexity", "accuracy", "tokens", "fingerprint"}}}, "loss" / "perplexity" /
    "accuracy": {evaluation: {domain: value}}, "metrics": {"loss" | "accuracy": {"AA" | "AIA" | "FGT" |
    "BWT" | "FWD": {stage: value}}}, "reference": {"loss" | "accuracy": {domain: value}} or null};
    for runs with `merge:` stages also "results_unmerged" (like "results", one entry per merging
    stage) and "loss_unmerged": {stage: {domain: loss}} of the stage's model before its merge.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / EVAL_JSON
        self._take(read_json(self.path, WHAT, FIX) or {})
        self.fresh: dict[tuple[bool, str], dict[str, dict]] = {}  # (unmerged, evaluation): results not yet written
        self.new_reference: dict | None = None  # a --reference given to this process, not yet written

    def _take(self, doc: dict) -> None:
        self.doc = doc
        self.results: dict[str, dict[str, dict]] = doc.get("results", {})
        self.reference: dict | None = doc.get("reference")
        self.unmerged: dict[str, dict[str, dict]] = doc.get("results_unmerged", {})

    def has(self, evaluation: str, domain: str, fingerprint: str, unmerged: bool = False) -> bool:
        table = self.unmerged if unmerged else self.results
        return table.get(evaluation, {}).get(domain, {}).get("fingerprint") == fingerprint

    def add(self, evaluation: str, results: dict[str, dict], unmerged: bool = False) -> None:
        """Results this process computed: in memory now, merged into eval.json by the next write."""
        (self.unmerged if unmerged else self.results).setdefault(evaluation, {}).update(results)
        self.fresh.setdefault((unmerged, evaluation), {}).update(results)

    def set_reference(self, reference: dict) -> None:
        self.reference = self.new_reference = reference

    def write(self, recipe: Recipe, domains: list[tuple[Domain, DomainData]]) -> dict:
        """Merge this process's new results into eval.json as it is on disk now, under its lock
        (files.update_json_locked): another writer's results (`strata eval` during training) stay."""
        def change(on_disk: dict) -> dict:
            self._take(on_disk)
            for (unmerged, evaluation), results in self.fresh.items():
                (self.unmerged if unmerged else self.results).setdefault(evaluation, {}).update(results)
            if self.new_reference is not None:
                self.reference = self.new_reference
            doc = self._document(recipe, domains)
            doc.update({k: v for k, v in on_disk.items() if k not in doc})  # sections others own (harness.py's tasks)
            return doc

        self.doc = update_json_locked(self.path, change, WHAT, FIX)
        self.fresh, self.new_reference = {}, None
        return self.doc

    def _document(self, recipe: Recipe, domains: list[tuple[Domain, DomainData]]) -> dict:
        order = [INIT] + [s.name for s in recipe.stages]
        names = [d.name for d, _ in domains]
        evaluations = [e for e in order if e in self.results]
        doc: dict[str, Any] = {
            "version": VERSION, "recipe": recipe.name, "evaluations": evaluations,
            "domains": [_domain_entry(recipe, d, data) for d, data in domains],
            "results": {e: {n: self.results[e][n] for n in names if n in self.results[e]} for e in evaluations},
        }
        for measure in ("loss", "perplexity", "accuracy"):
            doc[measure] = {e: {n: r[measure] for n, r in doc["results"][e].items()} for e in evaluations}
        doc["metrics"] = self.metrics(recipe, domains, doc)
        doc["reference"] = self.reference
        merging = [e for e in order if e in self.unmerged]
        if merging:  # the merged model stays the one above; these are its stages' trained weights
            doc["results_unmerged"] = {e: {n: self.unmerged[e][n] for n in names if n in self.unmerged[e]}
                                       for e in merging}
            doc["loss_unmerged"] = {e: {n: r["loss"] for n, r in doc["results_unmerged"][e].items()} for e in merging}
        return doc

    def metrics(self, recipe: Recipe, domains: list[tuple[Domain, DomainData]], doc: dict) -> dict:
        """CL metrics after each stage that has a full row (every earlier stage evaluated too)."""
        stages = []
        for stage in recipe.stages:
            if stage.name not in doc["results"]:
                break
            stages.append(stage.name)
        stage_of = [d.stage for d, _ in domains]
        out = {}
        for measure, higher in MEASURES.items():
            table = doc[measure]
            matrix = [[table[s].get(d.name) for d, _ in domains] for s in stages]
            initial = [table.get(INIT, {}).get(d.name) for d, _ in domains]
            ref = (self.reference or {}).get(measure)
            reference = [ref.get(d.name) for d, _ in domains] if ref else None
            values = cl_metrics(matrix, stage_of, higher, initial, reference)
            out[measure] = {k: dict(zip(stages, v)) for k, v in values.items()}
        return out


def read_reference(path: Path) -> dict:
    """A from-scratch reference for FWD: an eval.json (each domain's value after its own stage) or
    a plain {"loss": {domain: value}, "accuracy": {domain: value}}."""
    doc = read_json(Path(path), "reference")
    if doc is None:
        raise StrataError(f"{path}: reference not found")
    shape = f"{path}: not a reference (an eval.json, or {{\"loss\": {{domain: value}}, \"accuracy\": {{...}}}})"
    if not isinstance(doc, dict):
        raise StrataError(shape)
    if "results" not in doc:
        plain = {m: doc.get(m) for m in MEASURES if m in doc}
        if not plain or not all(isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values())
                                for v in plain.values()):
            raise StrataError(shape)
        return {m: dict(plain.get(m, {})) for m in MEASURES}
    out: dict[str, dict] = {m: {} for m in MEASURES}
    for d in doc.get("domains", []):
        after = doc["results"].get(d.get("stage")) or {}
        for m in MEASURES:  # a domain without held-out data after its stage has no reference value
            value = (after.get(d.get("name")) or {}).get(m)
            if value is not None:
                out[m][d["name"]] = value
    return out


# ------------------------------------------------------------------------------------------------
# Evaluating a run


class RunEvaluation:
    """Evaluations of one run: the initial model, after each stage, and filling in what is missing.

    Every rank makes the same calls (they read the same eval.json); rank 0 writes it. `sinks`
    (TensorBoard writer, W&B run; either None) also get each evaluation's loss and accuracy, at the
    global step where the evaluated stage ended (0 for the initial model).
    """

    def __init__(self, recipe: Recipe, run_dir: Path, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, sinks: tuple[Any, Any] = (None, None)):
        self.recipe, self.run_dir = recipe, Path(run_dir)
        self.device, self.dtype, self.sinks = torch.device(device), dtype, sinks
        self.rank, self.world = _rank_world()
        self.domains = [(d, data) for d in recipe_domains(recipe) if (data := domain_data(recipe, d)) is not None]
        self._by_tokenizer = {recipe.tokenizer: self.domains}
        self.file = EvalFile(self.run_dir)

    def domains_for(self, evaluation: str) -> list[tuple[Domain, DomainData]]:
        """The domains as the model of `evaluation` reads them: after a stage with a new tokenizer,
        in that tokenizer's shards (the initial model reads the recipe's)."""
        tok = self.recipe.tokenizer if evaluation == INIT else self.recipe.tokenizer_at(self.recipe.stage_index(evaluation))
        if tok not in self._by_tokenizer:
            self._by_tokenizer[tok] = [(d, data) for d in recipe_domains(self.recipe)
                                       if (data := domain_data(self.recipe, d, tok)) is not None]
        return self._by_tokenizer[tok]

    def missing(self, evaluation: str, unmerged: bool = False) -> list[tuple[Domain, DomainData]]:
        """Domains lacking results for `evaluation`; with `unmerged`, for its stage's unmerged model
        (none unless the stage merges)."""
        if unmerged and (evaluation == INIT or self.recipe.stages[self.recipe.stage_index(evaluation)].merge is None):
            return []
        return [(d, data) for d, data in self.domains_for(evaluation)
                if not self.file.has(evaluation, d.name, data.fingerprint, unmerged)]

    def evaluate(self, evaluation: str, model: torch.nn.Module) -> dict[str, dict]:
        """Score `model` on every domain that lacks results for `evaluation`; update eval.json."""
        return self._record(evaluation, self._score(evaluation, model, unmerged=False), unmerged=False)

    def evaluate_unmerged(self, stage: str, model: torch.nn.Module) -> dict[str, dict]:
        """Score a merging stage's trained weights, before its merge, beside the merged model (which
        alone enters the CL metrics); update eval.json's results_unmerged / loss_unmerged."""
        return self._record(stage, self._score(stage, model, unmerged=True), unmerged=True)

    def _score(self, evaluation: str, model: torch.nn.Module, unmerged: bool) -> dict[str, dict]:
        label = f"{evaluation} (unmerged)" if unmerged else evaluation
        return {d.name: {**evaluate_domain(model, data, self.recipe.seq_len, self.recipe.batch.micro,
                                           self.device, desc=f"eval {label}: {d.name}"),
                         "fingerprint": data.fingerprint}
                for d, data in self.missing(evaluation, unmerged)}

    def _record(self, evaluation: str, results: dict[str, dict], unmerged: bool) -> dict[str, dict]:
        """Add `results` to eval.json (rank 0 writes and prints; the sinks get the merged model's)."""
        if not results:
            return results
        self.file.add(evaluation, results, unmerged)
        if self.rank == 0:
            self.file.write(self.recipe, self.domains)
            record_contamination(self.run_dir, self.recipe)  # a section of its own (decontaminate.py)
            LOG.info(f"eval {evaluation}{' (unmerged)' if unmerged else ''}: " + " | ".join(
                f"{n} loss {r['loss']:.4f} ppl {r['perplexity']:.2f} acc {r['accuracy']:.1%}"
                for n, r in results.items()))
            if not unmerged and any(sink is not None for sink in self.sinks):
                from pipeline.train.sinks import log_scalars

                last = -1 if evaluation == INIT else self.recipe.stage_index(evaluation)
                records = read_manifest(self.run_dir).stages
                step = sum(records[i].steps or 0 for i in range(last + 1))
                log_scalars(*self.sinks, {f"eval/{m}/{n}": r[m] for n, r in results.items()
                                          for m in ("loss", "accuracy")}, step)
        if self.world > 1:
            dist.barrier()
        return results

    def finished_stages(self) -> list[int]:
        manifest = read_manifest(self.run_dir)
        records = manifest.stages if manifest else []
        return [i for i, s in enumerate(self.recipe.stages)
                if i < len(records) and records[i].name == s.name and records[i].status == "done"]

    def fill_in(self, tokenizer: Any = None, quiet: bool = False) -> list[str]:
        """Evaluate the initial model and every finished stage that lack results; returns what ran."""
        if not self.domains:
            if not quiet:  # rank 0 speaks for all
                LOG.info("eval: nothing to evaluate (no held-out documents: data.heldout is 0, and no eval: sets)")
            return []
        ran = []
        for index in [-1, *self.finished_stages()]:
            name = INIT if index < 0 else self.recipe.stages[index].name
            if self.missing(name, unmerged=True):  # a merging stage: its export before the merge
                self.evaluate_unmerged(name, self.load_model(index, tokenizer, UNMERGED))
                gc.collect()
                ran.append(f"{name} (unmerged)")
            if self.missing(name):
                self.evaluate(name, self.load_model(index, tokenizer))
                gc.collect()
                ran.append(name)
        return ran

    def load_model(self, index: int, tokenizer: Any, folder: str = "hf") -> torch.nn.Module:
        from pipeline.model.adapters import load_export
        from pipeline.model.build import build_model, load_pretrained

        if index < 0:
            if tokenizer is None:
                from pipeline.data.tokenizer import load_tokenizer

                tokenizer = load_tokenizer(self.recipe.tokenizer)
            model = build_model(self.recipe, tokenizer.vocab_size, tokenizer.eos_id)
        else:
            hf = stage_folder(self.run_dir, index, self.recipe.stages[index].name, folder)  # checksums checked
            if not (hf / "config.json").is_file():
                raise StrataError(f"{hf}: stage {self.recipe.stages[index].name!r} is finished but has no export")
            # with its adapter when that cannot be merged: the model as it was trained (model/adapters.py)
            model = load_export(hf, self.recipe.stages[index].adapter) if folder == "hf" else load_pretrained(hf)
        return model.to(device=self.device, dtype=self.dtype)
