"""The command line's own policies: known third-party deprecation warnings are silenced inside
Strata's commands only, and user errors print once under torchrun (rank 0)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from pipeline.cli import quiet_third_party_warnings, report


def test_deepspeeds_all_gather_into_tensor_warning_is_silenced_inside_strata_commands_only(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        out = torch.zeros(2)

        def gather() -> tuple[list[str], list[str]]:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                with quiet_third_party_warnings():
                    dist.all_gather_into_tensor(out, torch.ones(2))  # what DeepSpeed's ZeRO calls every step
                    warnings.warn("a warning of the user's own", FutureWarning, stacklevel=1)
                inside = [str(w.message) for w in seen]
                dist.all_gather_into_tensor(out, torch.ones(2))
            return inside, [str(w.message) for w in seen]

        inside, everything = gather()
        assert inside == ["a warning of the user's own"]
        assert any("all_gather_into_tensor` is deprecated" in m for m in everything)  # outside: untouched
    finally:
        dist.destroy_process_group()


def test_a_user_error_prints_on_rank_0_only_unless_it_happened_on_one_rank_alone(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    report("error: the same refusal on every rank", every_rank=True)
    report("error: this rank alone lost the run folder", every_rank=False)
    monkeypatch.setenv("RANK", "0")
    report("error: the same refusal on every rank", every_rank=True)
    assert capsys.readouterr().err == ("[rank 1] error: this rank alone lost the run folder\n"
                                       "error: the same refusal on every rank\n")


def test_which_errors_every_rank_raises_alike():
    from pipeline.errors import DataError, RecipeError, ResumeError, StrataError
    from pipeline.train.ownership import RunOwnershipLost

    assert RecipeError("r.yaml", ["seq_len: must be > 0"]).every_rank and ResumeError("changed").every_rank
    assert StrataError("x").on_every_rank().every_rank
    # a corrupt shard is read by one rank's slice; a lost run folder is noticed by one rank
    assert not DataError("shard.arrow: checksum mismatch").every_rank and not RunOwnershipLost("taken").every_rank
