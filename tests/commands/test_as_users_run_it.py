"""Every command, the way a team first runs Strata: its own saved checkpoint, a recipe as YAML text.

One module-scoped run shared by the tests below: a Llama with grouped-query attention and tied
embeddings and its own byte-level BPE tokenizer (tests/own_checkpoint.py), a `from_pretrained`
recipe of two stages -- English with RHO-1 selection scored against the checkpoint itself, then
Python code with replay, a LoRA adapter and distillation from the previous stage -- and a local
lm-eval task. check, prepare, score, train, eval (held-out and the task), report, expand and
merge run on it; every output is captured as from a pipe (a SLURM .out file).
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import DEMO, REPO, small_corpus, strata
from own_checkpoint import from_pretrained_recipe

from pipeline.cli import main

TASK = DEMO / "tasks" / "continuation_code.yaml"


@dataclass
class Flow:
    recipe: Path
    run: Path
    checkpoint: Path
    out: dict[str, str] = field(default_factory=dict)  # command -> its stdout + stderr


def stages_yaml(tmp: Path, checkpoint: Path) -> str:
    en, py = small_corpus(tmp, "en", 30, chars=1200), small_corpus(tmp, "code", 30, chars=1200)
    return f"""\
  - name: general
    tokens: 1024
    sources: [{{name: en, path: {en}}}]
    selection: {{method: rho1, ratio: 0.7, reference: {checkpoint}}}
    schedule: {{warmup: 1, max_lr: 1.0e-3, min_lr: 1.0e-4}}
  - name: code
    tokens: 1024
    sources: [{{name: py, path: {py}}}]
    replay: {{ratio: 0.25}}
    adapter: {{type: lora, r: 4, targets: [q_proj, v_proj]}}
    distill: {{teacher: previous, weight: 1.0, temperature: 2.0, on: replay}}
    schedule: {{warmup: 1, max_lr: 1.0e-3, min_lr: 1.0e-4}}
"""


def run_in_process(flow: Flow, name: str, args: list) -> None:
    """`strata ARGS` in this process, its output captured as through a pipe; asserts exit 0."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        code = main([str(a) for a in args])
    flow.out[name] = buf.getvalue()
    assert code == 0, flow.out[name][-3000:]


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory, own_checkpoint: Path) -> Flow:
    tmp = tmp_path_factory.mktemp("as-users-run-it")
    extra = f"checkpoint: {{every: 0}}\nevaluation: {{tasks: [{TASK}], limit: 4, stage: {{demo_continuation_code: code}}}}\n"
    f = Flow(from_pretrained_recipe(tmp, own_checkpoint, stages_yaml(tmp, own_checkpoint), extra), tmp / "run",
             own_checkpoint)
    run_in_process(f, "check", ["check", f.recipe])
    run_in_process(f, "prepare", ["prepare", f.recipe])
    run_in_process(f, "score", ["score", f.recipe, "--stage", "general", "--run-dir", f.run])
    trained = strata(["train", f.recipe, "--run-dir", f.run])  # a fresh process; the task reads its data from the repo
    f.out["train"] = trained.stdout + trained.stderr
    (f.run / "eval.json").rename(tmp / "eval-from-training.json")
    run_in_process(f, "eval", ["eval", f.run])
    run_in_process(f, "report", ["report", f.run])
    hf = [f.run / "stages" / s / "hf" for s in ("01-general", "02-code")]
    run_in_process(f, "expand", ["expand", hf[1], "--add-layers", 1, "--out", tmp / "expanded"])
    run_in_process(f, "merge", ["merge", hf[0], hf[1], "--weight", 0.5, "--out", tmp / "merged"])
    return f


def test_no_command_prints_carriage_return_frames_into_a_log_file(flow):
    assert set(flow.out) == {"check", "prepare", "score", "train", "eval", "report", "expand", "merge"}
    for name, text in flow.out.items():
        assert "\r" not in text, f"strata {name}: {text[-2000:]!r}"
        assert "Traceback" not in text and "FutureWarning" not in text, f"strata {name}: {text[-2000:]}"


def test_check_plans_the_checkpoint_and_warns_about_tiny_heldout_sets(flow):
    out = flow.out["check"]
    assert "139,584 of 139,584 parameters train (100.00%)" in out  # the checkpoint, counted on the meta device
    assert "1,792 of 141,376 parameters train (1.27%)" in out  # LoRA r=4 on q_proj and v_proj
    assert "distill: teacher previous" in out
    for name in ("en", "py"):  # 30 documents, 10% held out
        assert f"source {name!r}: its held-out set has" in flow.out["prepare"]
        assert "fewer than 20" in flow.out["prepare"]


def test_stage_exports_keep_the_checkpoints_architecture_and_tokenizer(flow):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for stage in ("01-general", "02-code"):
        hf = flow.run / "stages" / stage / "hf"
        model = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True)
        assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 4
        assert model.config.tie_word_embeddings and model.lm_head.weight is model.get_input_embeddings().weight
        ours, theirs = (AutoTokenizer.from_pretrained(p, local_files_only=True) for p in (hf, flow.checkpoint))
        assert ours.get_vocab() == theirs.get_vocab()
    assert "run folder:" in flow.out["train"] and "code" in flow.out["train"]


def test_eval_fills_heldout_losses_and_the_task_for_every_stage(flow):
    ev = json.loads((flow.run / "eval.json").read_text())
    assert set(ev["loss"]) == {"init", "general", "code"} and set(ev["loss"]["code"]) == {"en", "py"}
    assert set(ev["tasks"]["results"]) == {"init", "general", "code"}
    assert "acc" in ev["tasks"]["results"]["code"]["demo_continuation_code"]["metrics"]
    trained = json.loads((flow.run.parent / "eval-from-training.json").read_text())
    for stage, losses in trained["loss"].items():  # `strata eval` (from the exports) measures what training measured
        assert ev["loss"][stage] == pytest.approx(losses, rel=1e-6)


def test_report_shows_ce_methods_and_the_logged_replay_share(flow):
    report = (flow.run / "report.md").read_text()
    rows = [json.loads(line) for line in (flow.run / "metrics.jsonl").read_text().splitlines()]
    code = [r for r in rows if r["stage"] == 1]
    assert all("ce" in r and "kl" in r for r in code)  # distilling: the loss is CE + 4 x KL
    assert all(r["replay_share"] == pytest.approx(0.25) for r in code)  # 1 of 4 samples per step
    line = next(x for x in report.splitlines() if x.startswith("| 2 | code |"))
    assert f"| {code[0]['ce']:.4f} | {code[-1]['ce']:.4f} |" in line
    assert "replay 25%; LoRA r=4; distill (teacher previous, on replay)" in line
    assert "RHO-1 (keep 0.7)" in next(x for x in report.splitlines() if x.startswith("| 1 | general |"))
    assert "| code | 25.0% | general | en 25.0% | 0.250 |" in report


def test_task_plot_draws_every_metric_of_every_task(flow):
    import matplotlib

    from pipeline.evaluate.task_report import task_plot

    matplotlib.use("Agg")
    labels = []
    task_plot(json.loads((flow.run / "eval.json").read_text()), flow.run / "t.png",
              lambda fig, ax, out: labels.extend(ax.get_legend_handles_labels()[1]) or True)
    assert sorted(labels) == ["demo_continuation_code acc (code)", "demo_continuation_code acc_norm (code)"]


def test_expand_and_merge_work_on_the_stage_exports(flow):
    from transformers import AutoModelForCausalLM

    def load(p: Path):
        return AutoModelForCausalLM.from_pretrained(p, local_files_only=True).eval()

    code, expanded = load(flow.run / "stages" / "02-code" / "hf"), load(flow.run.parent / "expanded")
    assert expanded.config.num_hidden_layers == 3 and expanded.config.num_key_value_heads == 2
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(expanded(ids).logits, code(ids).logits, rtol=1e-4, atol=1e-4)  # function-preserving
    general, merged = load(flow.run / "stages" / "01-general" / "hf"), load(flow.run.parent / "merged")
    name = "model.layers.0.self_attn.q_proj.weight"
    want = 0.5 * general.state_dict()[name] + 0.5 * code.state_dict()[name]
    torch.testing.assert_close(merged.state_dict()[name], want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_ranks_under_torchrun_train_the_same_recipe(flow, tmp_path):
    run = tmp_path / "run2"
    proc = strata(["train", flow.recipe, "--run-dir", run], nproc=2)
    assert "\r" not in proc.stdout + proc.stderr
    one = [json.loads(x) for x in (flow.run / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in two] == [(r["stage"], r["step"]) for r in one]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-3)  # same global batches
    assert (run / "stages" / "02-code" / "hf" / "config.json").is_file()


@pytest.mark.parametrize("recipe", sorted((REPO / "data_recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_passes_strata_check(recipe, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the shipped recipes' paths are relative to the repository root
    assert main(["check", str(recipe)]) == 0, capsys.readouterr().err
    assert "Traceback" not in capsys.readouterr().err
