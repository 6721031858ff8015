"""`strata prepare`: shards, manifests, held-out split, idempotence, workers, array splits, corruption."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import TOKENIZER, demo_docs, recipe_dict, write_jsonl, write_recipe

from pipeline.cli import main
from pipeline.commands.prepare import LOCK_FILE
from pipeline.data import shards as shards_module
from pipeline.data.shards import SCHEMA_VERSION, load_shard, prepare_source, read_source_manifest, shard_paths
from pipeline.data.stream import StageStream
from pipeline.data.tokenizer import load_tokenizer
from pipeline.errors import DataError
from pipeline.recipe.load import load_recipe

NAMES = ("de", "en", "py")


def make_recipe(tmp: Path, sources: dict[str, Path], data_dir: Path | None = None, name: str = "recipe.yaml",
                **data) -> Path:
    stages = [
        {"name": "one", "tokens": 8 * 64 * 4, "schedule": {"max_lr": 1e-3},
         "sources": [{"name": "en", "path": str(sources["en"])}, {"name": "py", "path": str(sources["py"])}]},
        {"name": "two", "tokens": 8 * 64 * 4, "schedule": {"max_lr": 1e-3},
         "sources": [{"name": "de", "path": str(sources["de"])}], "replay": {"ratio": 0.2}},
    ]
    data_cfg = {"dir": str(data_dir or tmp / "data"), "heldout": 0.0, **data}
    return write_recipe(tmp, recipe_dict(tmp, stages, data=data_cfg), name)


def prepare(recipe: Path, *extra: str) -> int:
    return main(["prepare", str(recipe), "--quiet", *extra])


def source_texts(path: Path) -> list[str]:
    import io

    import zstandard

    with open(path, "rb") as f:
        lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        return [json.loads(line)["text"] for line in lines]


def documents(folder: Path, manifest_shards: list[dict]) -> list[tuple[int, ...]]:
    """Every document's token ids, in shard order."""
    out = []
    for s in manifest_shards:
        values, offsets = load_shard(str(folder / s["file"]), s["sha256"])
        out += [tuple(values[offsets[i]:offsets[i + 1]].tolist()) for i in range(len(offsets) - 1)]
    return out


def tree(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under folder but the data dir's lock (each prepare takes it): relative path -> (mtime_ns, bytes)."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


# ---------------------------------------------------------------------------------------------
# Manifests and shard contents


def test_prepare_writes_manifests_that_match_the_shards_and_the_tokenizer(tmp_path, three_sources, tokenizer, capsys):
    recipe = make_recipe(tmp_path, three_sources)
    assert prepare(recipe) == 0
    out = capsys.readouterr().out
    data = tmp_path / "data"
    assert sorted(p.name for p in data.iterdir()) == sorted([*NAMES, LOCK_FILE])
    for name, path in (("en", three_sources["en"]), ("py", three_sources["py"]), ("de", three_sources["de"])):
        folder = data / name
        manifest = json.loads((folder / "manifest.json").read_text())
        texts = source_texts(path)
        ids = tokenizer.encode_batch(texts)
        assert manifest["schema_version"] == SCHEMA_VERSION
        assert manifest["source"] == name
        assert manifest["documents"] == len(texts) == 30
        assert manifest["tokens"] == sum(len(x) for x in ids)
        assert manifest["tokens"] == sum(s["tokens"] for s in manifest["shards"])
        assert manifest["documents"] == sum(s["documents"] for s in manifest["shards"])
        assert manifest["dtype"] == "uint16"
        assert manifest["tokenizer"] == {"hash": tokenizer.content_hash, "vocab_size": 8000, "eos_id": tokenizer.eos_id}
        assert manifest["skipped_total"] == 0 and manifest["skipped"] == {}
        assert manifest["heldout"]["documents"] == 0 and manifest["heldout"]["shards"] == []
        for s in manifest["shards"]:
            blob = (folder / s["file"]).read_bytes()
            assert hashlib.sha256(blob).hexdigest() == s["sha256"]
            assert len(blob) == s["bytes"]
            values, offsets = load_shard(str(folder / s["file"]), s["sha256"])
            assert values.dtype == np.uint16
        # the shards hold exactly the tokenizer's ids, document by document, in source order
        assert documents(folder, manifest["shards"]) == [tuple(x) for x in ids]
        assert f"{manifest['tokens']:,}" in out
    assert out.count(" prepared ") == 3


def test_arrow_shards_are_zstd_compressed_ipc_files(tmp_path, three_sources):
    import pyarrow as pa

    recipe = make_recipe(tmp_path, three_sources)
    assert prepare(recipe) == 0
    path = tmp_path / "data" / "en" / "train-00000.arrow"
    reader = pa.ipc.open_file(pa.memory_map(str(path)))
    assert reader.schema.names == ["tokens"]
    assert pa.types.is_uint16(reader.schema.field("tokens").type.value_type)
    # compressed: the file is smaller than the raw uint16 tokens it holds
    manifest = read_source_manifest(path.parent)
    assert path.stat().st_size < manifest["tokens"] * 2


def test_skipped_records_are_recorded_in_the_manifest_and_reported(tmp_path, three_sources, capsys):
    good = [{"text": r["text"][:600]} for r in demo_docs("en", 5)]
    noisy = write_jsonl(tmp_path / "noisy.jsonl", good[:2] + ["{not json", {"body": "x"}] + good[2:] + [{"text": 5}])
    recipe = make_recipe(tmp_path, {**three_sources, "en": noisy})
    assert prepare(recipe) == 0
    captured = capsys.readouterr()
    manifest = read_source_manifest(tmp_path / "data" / "en")
    assert manifest["documents"] == 5
    assert manifest["skipped_total"] == 3
    entry = manifest["skipped"][str(noisy)]
    assert entry["count"] == 3 and sorted(sum((w["lines"] for w in entry["reasons"].values()), [])) == [3, 4, 8]
    assert "noisy.jsonl" in captured.err and "skipped 3" in captured.err


def test_small_shard_tokens_give_several_shards(tmp_path, three_sources):
    recipe = make_recipe(tmp_path, three_sources, shard_tokens=1500)
    assert prepare(recipe) == 0
    manifest = read_source_manifest(tmp_path / "data" / "de")
    shards = manifest["shards"]
    assert len(shards) >= 3
    assert [s["file"] for s in shards] == [f"train-{i:05d}.arrow" for i in range(len(shards))]
    for s in shards[:-1]:
        assert s["tokens"] >= 1500  # a shard is cut once it holds shard_tokens
    assert sum(s["tokens"] for s in shards) == manifest["tokens"]
    assert sorted(p.name for p in (tmp_path / "data" / "de").iterdir()) == sorted(
        ["manifest.json", "ngram-index.npy", "ngrams.npz"] + [s["file"] for s in shards])


# ---------------------------------------------------------------------------------------------
# Held-out split


def without_mtimes(shards: list[dict]) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "mtime_ns"} for s in shards]


def test_heldout_split_is_deterministic_and_disjoint_from_train(tmp_path, three_sources, tokenizer):
    a = make_recipe(tmp_path, three_sources, tmp_path / "data-a", "a.yaml", heldout=0.2)
    b = make_recipe(tmp_path, three_sources, tmp_path / "data-b", "b.yaml", heldout=0.2)
    assert prepare(a) == 0 and prepare(b) == 0
    total_heldout = 0
    for name in NAMES:
        ma, mb = read_source_manifest(tmp_path / "data-a" / name), read_source_manifest(tmp_path / "data-b" / name)
        assert without_mtimes(ma["heldout"]["shards"]) == without_mtimes(mb["heldout"]["shards"])
        assert without_mtimes(ma["shards"]) == without_mtimes(mb["shards"])
        held = documents(tmp_path / "data-a" / name, ma["heldout"]["shards"])
        train = documents(tmp_path / "data-a" / name, ma["shards"])
        assert held == documents(tmp_path / "data-b" / name, mb["heldout"]["shards"])
        assert not set(held) & set(train)
        assert len(held) + len(train) == 30 == ma["documents"] + ma["heldout"]["documents"]
        assert ma["heldout"]["tokens"] == sum(len(d) for d in held)
        # together they are exactly the source's documents
        all_ids = tokenizer.encode_batch(source_texts(three_sources[name]))
        assert sorted(held + train) == sorted(tuple(x) for x in all_ids)
        total_heldout += len(held)
    assert 0 < total_heldout < 45  # about 20% of 90 documents


def test_heldout_split_depends_on_the_document_not_its_position(tmp_path, three_sources):
    """Reordering a source keeps the same documents held out."""
    records = [{"text": t} for t in source_texts(three_sources["en"])]
    reordered = write_jsonl(tmp_path / "reordered.jsonl", records[::-1])
    a = make_recipe(tmp_path, three_sources, tmp_path / "data-a", "a.yaml", heldout=0.3)
    b = make_recipe(tmp_path, {**three_sources, "en": reordered}, tmp_path / "data-b", "b.yaml", heldout=0.3)
    assert prepare(a) == 0 and prepare(b) == 0
    ma, mb = read_source_manifest(tmp_path / "data-a" / "en"), read_source_manifest(tmp_path / "data-b" / "en")
    held_a = documents(tmp_path / "data-a" / "en", ma["heldout"]["shards"])
    held_b = documents(tmp_path / "data-b" / "en", mb["heldout"]["shards"])
    assert held_a and sorted(held_a) == sorted(held_b)


# ---------------------------------------------------------------------------------------------
# Idempotence and incremental re-preparation


def test_prepare_again_is_a_no_op(tmp_path, three_sources, capsys):
    recipe = make_recipe(tmp_path, three_sources, shard_tokens=4000)
    assert prepare(recipe) == 0
    before = tree(tmp_path / "data")
    capsys.readouterr()
    assert prepare(recipe) == 0
    out = capsys.readouterr().out
    assert tree(tmp_path / "data") == before  # same files, same bytes, same mtimes
    for name in NAMES:
        assert any(name in line and "up to date" in line for line in out.splitlines()), out
    assert out.count("up to date") == 3


def test_touching_one_source_re_prepares_only_that_source(tmp_path, three_sources, capsys):
    recipe = make_recipe(tmp_path, three_sources)
    assert prepare(recipe) == 0
    before = tree(tmp_path / "data")
    st = three_sources["py"].stat()
    os.utime(three_sources["py"], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    capsys.readouterr()
    assert prepare(recipe) == 0
    out = capsys.readouterr().out
    lines = {name: next(ln for ln in out.splitlines() if ln.strip().startswith(name + " ")) for name in NAMES}
    assert "up to date" in lines["en"] and "up to date" in lines["de"]
    assert "prepared" in lines["py"] and "up to date" not in lines["py"]
    after = tree(tmp_path / "data")
    for key, value in before.items():
        if key.startswith(("en/", "de/")):
            assert after[key] == value, key
    # same content: the shards are the same bytes (rewritten), the manifest records the new input
    assert after["py/train-00000.arrow"][1] == before["py/train-00000.arrow"][1]
    assert after["py/train-00000.arrow"][0] != before["py/train-00000.arrow"][0]


def test_changing_a_source_re_prepares_it_with_the_new_content(tmp_path, three_sources, capsys):
    recipe = make_recipe(tmp_path, three_sources)
    assert prepare(recipe) == 0
    records = [{"text": t} for t in source_texts(three_sources["de"])][:11]
    write_jsonl(three_sources["de"], records, compress=True)
    capsys.readouterr()
    assert prepare(recipe) == 0
    out = capsys.readouterr().out
    assert out.count("up to date") == 2
    assert read_source_manifest(tmp_path / "data" / "de")["documents"] == 11


def test_changing_the_shard_size_re_prepares(tmp_path, three_sources, capsys):
    recipe = make_recipe(tmp_path, three_sources)
    assert prepare(recipe) == 0
    recipe = make_recipe(tmp_path, three_sources, shard_tokens=1000)
    capsys.readouterr()
    assert prepare(recipe) == 0
    assert "up to date" not in capsys.readouterr().out
    assert len(read_source_manifest(tmp_path / "data" / "en")["shards"]) > 1


# ---------------------------------------------------------------------------------------------
# Workers and array tasks


def test_two_workers_give_byte_identical_shards(tmp_path, three_sources, monkeypatch):
    monkeypatch.setattr(shards_module, "BATCH_DOCS", 3)  # many small batches in flight, out of order in time
    one = make_recipe(tmp_path, three_sources, tmp_path / "w1", "w1.yaml", shard_tokens=2500, heldout=0.1)
    two = make_recipe(tmp_path, three_sources, tmp_path / "w2", "w2.yaml", shard_tokens=2500, heldout=0.1)
    assert prepare(one, "--workers", "1") == 0
    assert prepare(two, "--workers", "2") == 0
    a = {k: v[1] for k, v in tree(tmp_path / "w1").items()}
    b = {k: v[1] for k, v in tree(tmp_path / "w2").items()}
    assert a.keys() == b.keys()
    assert sum(k.endswith(".arrow") for k in a) > 6
    for key in a:
        if key.endswith((".arrow", ".npy")):
            assert a[key] == b[key], key
        elif key.endswith(".npz"):  # a zip whose entries carry their write time: compare the arrays
            za, zb = np.load(io.BytesIO(a[key])), np.load(io.BytesIO(b[key]))
            assert all(np.array_equal(za[k], zb[k]) for k in za.files) and za.files == zb.files, key
        else:
            ma, mb = json.loads(a[key]), json.loads(b[key])
            for m in (ma, mb):  # files written at different times: everything else must match
                m["shards"], m["heldout"]["shards"] = without_mtimes(m["shards"]), without_mtimes(m["heldout"]["shards"])
            assert ma == mb, key


def test_shard_index_splits_the_sources_between_array_tasks(tmp_path, three_sources, capsys):
    recipe = make_recipe(tmp_path, three_sources)
    data = tmp_path / "data"
    assert prepare(recipe, "--shard-index", "0", "--num-shards", "2") == 0
    first = {p.name for p in data.iterdir() if (p / "manifest.json").is_file()}
    out0 = capsys.readouterr().out
    assert prepare(recipe, "--shard-index", "1", "--num-shards", "2") == 0
    out1 = capsys.readouterr().out
    second = {p.name for p in data.iterdir() if (p / "manifest.json").is_file()} - first
    assert first and second and not first & second
    assert first | second == set(NAMES)
    assert "already prepared" not in out1  # the second task did not touch the first task's files
    # sources of one file each: the files, hence the sources, are split between the tasks
    assert f"{len(first)} of 3 input file(s)" in out0 and f"{len(second)} of 3 input file(s)" in out1


def test_bad_shard_index_is_refused(tmp_path, three_sources, capsys):
    recipe = make_recipe(tmp_path, three_sources)
    assert prepare(recipe, "--shard-index", "2", "--num-shards", "2") != 0
    out, err = capsys.readouterr()
    assert "--shard-index" in err and "Traceback" not in out + err
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------------------------------------
# Corruption


def _first_shard(tmp_path: Path, name: str = "en") -> tuple[Path, str]:
    manifest = read_source_manifest(tmp_path / "data" / name)
    s = manifest["shards"][0]
    return tmp_path / "data" / name / s["file"], s["sha256"]


def _flip_middle(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    mid = len(blob) // 2
    for i in range(mid, mid + 4):
        blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))


def _truncate(path: Path) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) * 2 // 3])


@pytest.mark.parametrize("damage", [_flip_middle, _truncate], ids=["flipped-bytes", "truncated"])
def test_damaged_shard_is_reported_by_name(tmp_path, three_sources, damage):
    recipe = make_recipe(tmp_path, three_sources)
    assert prepare(recipe) == 0
    path, sha = _first_shard(tmp_path)
    damage(path)
    with pytest.raises(DataError) as info:
        load_shard(str(path), sha)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("damage", [_flip_middle, _truncate], ids=["flipped-bytes", "truncated"])
def test_damaged_shard_stops_the_stream_with_its_name(tmp_path, three_sources, damage):
    recipe_path = make_recipe(tmp_path, three_sources)
    assert prepare(recipe_path) == 0
    path, _ = _first_shard(tmp_path, "py")
    damage(path)
    stream = StageStream(load_recipe(recipe_path), 0)
    with pytest.raises(DataError) as info:
        next(stream)
    assert str(path) in str(info.value)


def test_missing_shard_is_reported_by_name(tmp_path, three_sources):
    recipe = make_recipe(tmp_path, three_sources)
    assert prepare(recipe) == 0
    path, sha = _first_shard(tmp_path, "de")
    path.unlink()
    with pytest.raises(DataError, match="shard missing") as info:
        load_shard(str(path), sha)
    assert str(path) in str(info.value)


def test_truncated_shard_is_re_prepared(tmp_path, three_sources, capsys):
    recipe = make_recipe(tmp_path, three_sources)
    assert prepare(recipe) == 0
    path, sha = _first_shard(tmp_path)
    good = path.read_bytes()
    _truncate(path)
    capsys.readouterr()
    assert prepare(recipe) == 0
    assert capsys.readouterr().out.count("up to date") == 2
    assert path.read_bytes() == good
    load_shard(str(path), sha)


def test_corrupt_manifest_is_a_data_error(tmp_path, three_sources):
    recipe = make_recipe(tmp_path, three_sources)
    assert prepare(recipe) == 0
    manifest = tmp_path / "data" / "en" / "manifest.json"
    manifest.write_text(manifest.read_text()[:50])
    with pytest.raises(DataError, match="unreadable shard manifest .*; run strata prepare again"):
        read_source_manifest(manifest.parent)


# ---------------------------------------------------------------------------------------------
# Failures and temporary files


def test_source_with_only_malformed_records_is_a_clear_error(tmp_path, three_sources, capsys):
    junk = write_jsonl(tmp_path / "junk.jsonl", ["{nope", {"title": "no text"}, {"text": 3}, "[]"])
    recipe = make_recipe(tmp_path, {**three_sources, "de": junk})
    assert prepare(recipe) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert "junk.jsonl" in err and "'de'" in err and "no documents" in err and "4 skipped" in err
    assert not (tmp_path / "data" / "de").exists()
    assert not [p for p in (tmp_path / "data").rglob(".*")]

    loaded = load_recipe(recipe)
    with pytest.raises(DataError, match=r"junk\.jsonl.*no documents"):
        prepare_source(loaded.stage("two").sources[0], loaded, load_tokenizer(loaded.tokenizer), progress=False)


def test_on_error_fail_stops_prepare_naming_the_line(tmp_path, three_sources, capsys):
    good = [{"text": r["text"][:600]} for r in demo_docs("de", 3)]
    bad = write_jsonl(tmp_path / "strict.jsonl", good + [{"text": None}])
    raw = recipe_dict(tmp_path, [{"name": "one", "tokens": 1024, "schedule": {"max_lr": 1e-3},
                                  "sources": [{"name": "de", "path": str(bad), "on_error": "fail"}]}])
    recipe = write_recipe(tmp_path, raw)
    assert prepare(recipe) == 1
    out, err = capsys.readouterr()
    assert "strict.jsonl:4:" in err and "Traceback" not in out + err
    assert not [p for p in (tmp_path / "data").rglob("*") if p.name.startswith(".")]


def test_no_temporary_files_are_left_after_prepare(tmp_path, three_sources, capsys):
    recipe = make_recipe(tmp_path, three_sources, shard_tokens=2000, heldout=0.2)
    assert prepare(recipe) == 0
    # re-prepare over existing shards (the old folder is swapped out and removed)
    for p in three_sources.values():
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert prepare(recipe, "--workers", "2") == 0
    leftovers = [p for p in (tmp_path / "data").rglob("*") if p.name.startswith(".") or "tmp" in p.name]
    assert leftovers == []
    for name in NAMES:
        folder = tmp_path / "data" / name
        manifest = read_source_manifest(folder)
        listed = {s["file"] for s in manifest["shards"] + manifest["heldout"]["shards"]} | {"manifest.json"}
        assert {p.name for p in folder.iterdir()} == listed | set(manifest["ngrams"]["files"])


def test_shard_paths_follow_the_manifest(tmp_path, three_sources):
    recipe_path = make_recipe(tmp_path, three_sources, shard_tokens=2000, heldout=0.2)
    assert prepare(recipe_path) == 0
    recipe = load_recipe(recipe_path)
    manifest = read_source_manifest(tmp_path / "data" / "en")
    assert [Path(p).name for p, _ in shard_paths(recipe, "en")] == [s["file"] for s in manifest["shards"]]
    assert [Path(p).name for p, _ in shard_paths(recipe, "en", "heldout")] == \
        [s["file"] for s in manifest["heldout"]["shards"]]


def test_text_with_a_lone_surrogate_does_not_crash_prepare(tmp_path, three_sources, capsys):
    good = [json.dumps({"text": r["text"][:600]}) for r in demo_docs("de", 3)]
    path = tmp_path / "surrogate.jsonl"
    path.write_text("\n".join([good[0], '{"text": "broken \\ud800 text"}', good[1], good[2]]) + "\n")
    recipe = make_recipe(tmp_path, {**three_sources, "de": path})
    assert prepare(recipe) == 0
    manifest = read_source_manifest(tmp_path / "data" / "de")
    assert manifest["documents"] + manifest["skipped_total"] == 4
    assert manifest["documents"] >= 3


def test_prepare_again_repairs_a_shard_with_flipped_bytes(tmp_path, three_sources, capsys):
    recipe = make_recipe(tmp_path, three_sources)
    assert prepare(recipe) == 0
    path, sha = _first_shard(tmp_path)
    good = path.read_bytes()
    _flip_middle(path)
    with pytest.raises(DataError, match="run strata prepare again"):
        load_shard(str(path), sha)
    assert prepare(recipe) == 0
    assert path.read_bytes() == good


def _spoil_manifest_json(manifest: Path) -> None:
    manifest.write_text(manifest.read_text()[:50])


def _old_schema_version(manifest: Path) -> None:
    data = json.loads(manifest.read_text())
    data["schema_version"] = SCHEMA_VERSION - 1
    manifest.write_text(json.dumps(data))


@pytest.mark.parametrize("spoil", [_spoil_manifest_json, _old_schema_version], ids=["corrupt-json", "old-schema"])
def test_prepare_replaces_an_unreadable_or_outdated_manifest(tmp_path, three_sources, capsys, spoil):
    recipe = make_recipe(tmp_path, three_sources)
    assert prepare(recipe) == 0
    manifest = tmp_path / "data" / "en" / "manifest.json"
    spoil(manifest)
    with pytest.raises(DataError, match="run strata prepare again"):
        read_source_manifest(manifest.parent)
    capsys.readouterr()
    assert prepare(recipe) == 0, capsys.readouterr().err
    assert read_source_manifest(manifest.parent)["schema_version"] == SCHEMA_VERSION


def test_prepare_cleans_the_temporary_folder_of_a_killed_run(tmp_path, three_sources):
    recipe = make_recipe(tmp_path, three_sources)
    stale = tmp_path / "data" / ".tmp-en-999999"  # what a prepare killed mid-source leaves behind
    stale.mkdir(parents=True)
    (stale / "train-00000.arrow").write_bytes(b"partial")
    assert prepare(recipe) == 0
    assert [p.name for p in (tmp_path / "data").iterdir() if p.name.startswith(".")] == []
