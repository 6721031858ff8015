"""`strata check` and `strata train` on a team's own saved checkpoint (tests/own_checkpoint.py)."""

from __future__ import annotations

from conftest import small_corpus
from own_checkpoint import from_pretrained_recipe

from pipeline.cli import main


def two_stages(tmp_path, second: str = "") -> str:
    en, py = small_corpus(tmp_path, "en", 10, chars=600), small_corpus(tmp_path, "code", 10, chars=600)
    return f"""\
  - name: general
    tokens: 1024
    sources: [{{name: en, path: {en}}}]
    schedule: {{warmup: 1, max_lr: 1.0e-3, min_lr: 1.0e-4}}
  - name: code
    tokens: 1024
    sources: [{{name: py, path: {py}}}]
    replay: {{ratio: 0.25}}
    schedule: {{warmup: 1, max_lr: 1.0e-3, min_lr: 1.0e-4}}
{second}"""


def test_check_counts_the_parameters_of_a_from_pretrained_model_without_loading_it(tmp_path, own_checkpoint, capsys):
    lora = "    adapter: {type: lora, r: 4, targets: [q_proj, k_proj]}\n"
    path = from_pretrained_recipe(tmp_path, own_checkpoint, two_stages(tmp_path, lora))
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    # 1024 x 64 tied embedding once; 2 blocks of q,o (64x64), k,v (64x32: 2 of 4 heads), mlp 3 x 64x128, 2 norms; final norm
    assert "139,584 of 139,584 parameters train (100.00%)" in out
    # LoRA r=4 on q (64->64) and k (64->32): 2 layers x (4x64 + 64x4 + 4x64 + 32x4)
    assert "1,792 of 141,376 parameters train (1.27%)" in out
    assert "Traceback" not in out + err


def test_a_misspelt_adapter_target_is_a_recipe_error_at_check_and_before_training(tmp_path, own_checkpoint, capsys):
    lora = "    adapter: {type: lora, r: 4, targets: [q_proj, query_key_value]}\n"
    path = from_pretrained_recipe(tmp_path, own_checkpoint, two_stages(tmp_path, lora))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "stages[1].adapter.targets[1]: 'query_key_value' matches no module of the model" in err
    assert str(path) in err and "Traceback" not in err
    # train refuses it before stage 0 trains (not when stage 1 starts)
    assert main(["train", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    assert "stages[1].adapter.targets[1]: 'query_key_value' matches no module" in capsys.readouterr().err
    assert not (tmp_path / "run" / "stages").exists()


def test_a_trainable_pattern_that_matches_nothing_is_named_with_its_index(tmp_path, own_checkpoint, capsys):
    path = from_pretrained_recipe(tmp_path, own_checkpoint, two_stages(tmp_path, "    trainable: [lm_head.*, model.norm.wieght]\n"))
    assert main(["check", str(path)]) == 2
    assert "stages[1].trainable[1]: 'model.norm.wieght' matches no parameter" in capsys.readouterr().err
