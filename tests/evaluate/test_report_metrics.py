"""The one reader of metrics.jsonl: a last line torn by a kill is skipped with a note (the report
still comes out), a bad line anywhere else is one error naming its line."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.cli import main
from pipeline.train.run_folder import read_metrics


def run_folder(tmp_path, last: str, middle: str | None = None):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({"name": "t", "stages": [{"name": "general"}]}))
    rows = [json.dumps({"stage": 0, "stage_name": "general", "step": s, "tokens": 512 * s, "loss": 5.0 - s,
                        "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0, "step_s": 1.0, "data_s": 0.0, "time": s})
            for s in (1, 2, 3)]
    if middle is not None:
        rows.insert(1, middle)
    (run / "metrics.jsonl").write_text("\n".join(rows) + "\n" + last)
    return run


def test_report_skips_a_torn_last_metrics_line_with_a_note(tmp_path, capsys):
    run = run_folder(tmp_path, last='{"stage": 0, "stage_name": "gen')  # killed mid-write
    log = read_metrics(run)
    assert [r["step"] for r in log.rows] == [1, 2, 3] and log.torn_line == 4
    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"note: {run / 'metrics.jsonl'}:4: skipped a torn last line" in err
    report = (run / "report.md").read_text()
    assert "3 logged step(s)" in report and "metrics.jsonl:4: skipped a torn last line" in report


def test_a_bad_metrics_line_before_the_last_is_an_error_naming_the_line(tmp_path, capsys):
    run = run_folder(tmp_path, last="", middle="{not json")
    assert main(["report", str(run)]) == 1
    assert f"error: {run / 'metrics.jsonl'}:2: not a JSON line" in capsys.readouterr().err


@pytest.mark.parametrize("last", ["", "\n"])
def test_a_complete_metrics_file_has_no_torn_line(tmp_path, last):
    assert read_metrics(run_folder(tmp_path, last=last)).torn_line is None
