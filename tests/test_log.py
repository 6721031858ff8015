"""The one rank-aware logger of library code (pipeline/distributed.py's `log`): rank 0 speaks for
every rank, a message only one rank has says `[rank N]`, plain lines on the current stdout."""

from __future__ import annotations

from pipeline.distributed import ONE_RANK, log


def test_rank_zero_speaks_for_all_and_a_one_rank_message_names_its_rank(monkeypatch, capsys):
    logger = log("pipeline.train.example")
    monkeypatch.setenv("RANK", "0")
    logger.info("stage 1: starting")
    monkeypatch.setenv("RANK", "1")
    logger.info("stage 1: starting")  # the same message on rank 1: not repeated
    logger.info("shard 3 is corrupt", extra=ONE_RANK)
    logger.debug("not shown below INFO")
    assert capsys.readouterr().out.splitlines() == ["stage 1: starting", "[rank 1] shard 3 is corrupt"]
