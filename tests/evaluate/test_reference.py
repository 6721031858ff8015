"""`strata eval --reference FILE`: the from-scratch reference for FWD, read strictly."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import StrataError
from pipeline.evaluate.heldout import read_reference


@pytest.mark.parametrize("content", ["[1, 2]", '{"loss": [1]}', '{"stages": []}', '{"loss": {"en": "low"}}'])
def test_a_file_that_is_not_a_reference_is_one_error_naming_it(tmp_path, content):
    path = tmp_path / "ref.json"
    path.write_text(content)
    with pytest.raises(StrataError, match=r"ref\.json: not a reference"):
        read_reference(path)


def test_an_eval_json_reference_takes_each_domain_after_its_own_stage_and_skips_missing_values(tmp_path):
    doc = {"domains": [{"name": "en", "stage": "general"}, {"name": "de", "stage": "german"},
                       {"name": "news", "stage": None}],
           "results": {"general": {"en": {"loss": 2.5, "accuracy": 0.3}},
                       "german": {}}}  # no held-out data for de after its stage
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(doc))
    ref = read_reference(path)
    assert ref["loss"] == {"en": 2.5} and ref["accuracy"] == {"en": 0.3}
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"loss": {"en": 2.0, "de": 3.0}}))
    assert read_reference(plain)["loss"] == {"en": 2.0, "de": 3.0}
