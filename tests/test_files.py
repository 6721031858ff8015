"""One reader for the JSON files of a run, with one error policy."""

from __future__ import annotations

import pytest

from pipeline.errors import ResumeError, StrataError
from pipeline.files import inside, name_problem, read_json, write_json_atomic
from pipeline.train.run_folder import export_dir, read_manifest, stage_dir


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


@pytest.mark.parametrize("name", ["../../../../escaped", "a/b", "..", ".hidden", "-x", "a b", "x@1", "", "é" * 65,
                                  "/abs", "a\\b", "a\nb"])
def test_names_that_would_leave_or_confuse_their_folder_are_refused(name):
    assert name_problem(name) is not None


@pytest.mark.parametrize("name", ["general", "news-2024", "v1.2_final", "médecine", "2015-2019", "a" * 64])
def test_plain_names_pass_and_their_folders_stay_inside_the_run(name, tmp_path):
    assert name_problem(name) is None
    for path in (stage_dir(tmp_path, 0, name), export_dir(tmp_path, 11, name)):
        assert path.resolve().is_relative_to(tmp_path.resolve() / "stages")


def test_a_path_leaving_its_root_is_refused_whatever_built_it(tmp_path):
    assert inside(tmp_path, tmp_path / "stages" / "01-x") == tmp_path / "stages" / "01-x"
    for bad in (tmp_path / "stages" / "01-../../../../escaped", tmp_path / ".." / "x", tmp_path, "/etc/passwd"):
        with pytest.raises(StrataError, match="would be written outside"):
            inside(tmp_path, bad)
