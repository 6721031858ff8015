"""The one rank-aware logger of library code (pipeline/distributed.py's `log`): rank 0 speaks for
every rank, a message only one rank has says `[rank N]`, plain lines on the current stdout."""

from __future__ import annotations

import ast

from conftest import REPO

from pipeline.distributed import ONE_RANK, log

COMMANDS = ("pipeline/commands/", "pipeline/cli.py")  # they print their results; the rest logs


def test_rank_zero_speaks_for_all_and_a_one_rank_message_names_its_rank(monkeypatch, capsys):
    logger = log("pipeline.train.example")
    monkeypatch.setenv("RANK", "0")
    logger.info("stage 1: starting")
    monkeypatch.setenv("RANK", "1")
    logger.info("stage 1: starting")  # the same message on rank 1: not repeated
    logger.info("shard 3 is corrupt", extra=ONE_RANK)
    logger.debug("not shown below INFO")
    assert capsys.readouterr().out.splitlines() == ["stage 1: starting", "[rank 1] shard 3 is corrupt"]


def library_prints() -> list[str]:
    """'path:line' of every call of print in pipeline/ outside the commands (read with `ast`)."""
    out = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(COMMANDS):
            continue
        out += [f"{rel}:{node.lineno}" for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]
    return out


def test_library_code_logs_and_only_commands_print():
    assert library_prints() == [], "library code logs through pipeline.distributed.log; commands print results"
