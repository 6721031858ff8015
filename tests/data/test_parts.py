"""One source over many nodes: its input files split among the tasks of an array, same data whatever the count."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import demo_docs, recipe_dict, write_jsonl, write_recipe

from pipeline.cli import main
from pipeline.data.shards import load_shard, read_source_manifest

SAME = ("documents", "tokens", "out_of_range", "empty", "skipped_total", "skipped")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """One source of four files (one compressed, one with malformed lines) of real demo text."""
    folder = tmp_path_factory.mktemp("corpus") / "en"
    folder.mkdir()
    docs = [{"text": r["text"][:800]} for r in demo_docs("en", 48)]
    for k in range(4):
        chunk = docs[k * 12:(k + 1) * 12]
        if k == 2:
            chunk = chunk[:5] + ["{not json", {"title": "no text"}] + chunk[5:]
        write_jsonl(folder / f"part-{k}.jsonl{'.zst' if k == 1 else ''}", chunk, compress=k == 1)
    return folder


def recipe_for(tmp: Path, corpus: Path, data: str) -> Path:
    stage = {"name": "general", "tokens": 4096, "schedule": {"max_lr": 1e-3},
             "sources": [{"name": "en", "path": str(corpus)}]}
    return write_recipe(tmp, recipe_dict(tmp, [stage], data={"dir": str(tmp / data), "heldout": 0.2}), f"{data}.yaml")


def prepare(recipe: Path, *extra) -> None:
    assert main(["prepare", str(recipe), "--quiet", *map(str, extra)]) == 0


def documents(folder: Path, manifest: dict, split: str) -> list[tuple]:
    shards = manifest["shards"] if split == "train" else manifest["heldout"]["shards"]
    out = []
    for s in shards:
        values, offsets = load_shard(str(folder / s["file"]), s["sha256"])
        out += [tuple(values[offsets[d]:offsets[d + 1]].tolist()) for d in range(len(offsets) - 1)]
    return sorted(out)


def test_three_tasks_prepare_the_same_source_as_one(tmp_path, corpus):
    one = recipe_for(tmp_path, corpus, "one")
    prepare(one)
    three = recipe_for(tmp_path, corpus, "three")
    for task in range(3):
        assert read_source_manifest(tmp_path / "three" / "en") is None  # not prepared until the last task ends
        prepare(three, "--shard-index", task, "--num-shards", 3)
    a, b = read_source_manifest(tmp_path / "one" / "en"), read_source_manifest(tmp_path / "three" / "en")
    assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}
    assert a["skipped_total"] == 2 and a["heldout"]["documents"] > 0
    assert {k: a["heldout"][k] for k in ("documents", "tokens")} == {k: b["heldout"][k] for k in ("documents", "tokens")}
    for split in ("train", "heldout"):
        assert documents(tmp_path / "one" / "en", a, split) == documents(tmp_path / "three" / "en", b, split)
    assert not list((tmp_path / "three").glob(".parts-*"))  # staging removed
    prepare(three, "--shard-index", 1, "--num-shards", 3)  # up to date: the manifest stays
    assert read_source_manifest(tmp_path / "three" / "en") == b


def test_a_killed_task_is_redone_without_touching_finished_parts(tmp_path, corpus, capsys):
    recipe = recipe_for(tmp_path, corpus, "data")
    prepare(recipe, "--shard-index", 0, "--num-shards", 3)  # parts 0 and 3
    [staged] = list((tmp_path / "data").glob(".parts-en/*"))
    finished = {p.name: p.stat().st_ino for p in (staged / "00000").iterdir()}
    killed = staged / ".tmp-00001-999999"  # what a task killed while writing part 1 leaves
    killed.mkdir()
    (killed / "train-00000.arrow").write_bytes(b"half a shard")
    prepare(recipe, "--shard-index", 1, "--num-shards", 3)
    assert not killed.exists() and (staged / "00001" / "part.json").is_file()
    assert {p.name: p.stat().st_ino for p in (staged / "00000").iterdir()} == finished
    # The task that would finalize dies after taking the lock: --finalize finishes the job.
    (staged / "finalize.lock").write_text("node7 1234\n")
    prepare(recipe, "--shard-index", 2, "--num-shards", 3)
    assert read_source_manifest(tmp_path / "data" / "en") is None
    assert "finalize.lock" in capsys.readouterr().out
    prepare(recipe, "--finalize")
    manifest = read_source_manifest(tmp_path / "data" / "en")
    assert manifest["documents"] + manifest["heldout"]["documents"] == 48 and manifest["skipped_total"] == 2
    # part 0's shards were linked into the source, never rewritten
    linked = {s["file"][len("p00000-"):]: (tmp_path / "data" / "en" / s["file"]).stat().st_ino
              for s in manifest["shards"] + manifest["heldout"]["shards"] if s["file"].startswith("p00000-")}
    assert linked == {k: v for k, v in finished.items() if k not in ("part.json", "ngrams-raw.npz")}


def test_finalize_refuses_while_parts_are_missing(tmp_path, corpus, capsys):
    recipe = recipe_for(tmp_path, corpus, "data")
    prepare(recipe, "--shard-index", 0, "--num-shards", 3)
    assert main(["prepare", str(recipe), "--finalize"]) == 1
    assert "en (2 of 4 parts missing)" in capsys.readouterr().err
    assert read_source_manifest(tmp_path / "data" / "en") is None


def test_workers_read_whole_files_in_parallel_with_the_same_data(tmp_path, corpus, capsys):
    one = recipe_for(tmp_path, corpus, "one")
    prepare(one)
    two = recipe_for(tmp_path, corpus, "two")
    prepare(two, "--workers", 2)
    assert "part     3 prepared" in capsys.readouterr().out  # went through the parts, one file per worker
    a, b = read_source_manifest(tmp_path / "one" / "en"), read_source_manifest(tmp_path / "two" / "en")
    assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}
    for split in ("train", "heldout"):
        assert documents(tmp_path / "one" / "en", a, split) == documents(tmp_path / "two" / "en", b, split)
