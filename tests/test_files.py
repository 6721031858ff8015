"""One reader for the JSON files of a run, with one error policy."""

from __future__ import annotations

import pytest

from pipeline.errors import ResumeError, StrataError
from pipeline.files import read_json, write_json_atomic
from pipeline.train.run_folder import read_manifest


def test_read_json_none_when_absent_one_error_naming_the_file_when_torn(tmp_path):
    assert read_json(tmp_path / "absent.json", "run manifest") is None
    write_json_atomic(tmp_path / "ok.json", {"a": 1})
    assert read_json(tmp_path / "ok.json", "run manifest") == {"a": 1}
    (tmp_path / "torn.json").write_text('{"a": ')
    with pytest.raises(StrataError, match=r"torn\.json: unreadable evaluation results \(.+\); delete it"):
        read_json(tmp_path / "torn.json", "evaluation results", "delete it")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(StrataError, match=r"binary\.json: unreadable scores meta"):
        read_json(tmp_path / "binary.json", "scores meta")


def test_a_torn_run_manifest_is_a_resume_error_naming_it(tmp_path):
    (tmp_path / "run.json").write_text('{"recipe": "t", "world_size": 1, "stag')
    with pytest.raises(ResumeError, match=r"run\.json: unreadable run manifest"):
        read_manifest(tmp_path)
