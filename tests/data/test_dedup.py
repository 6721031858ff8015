"""Deduplication at prepare time: planted exact and near duplicates are removed (and nothing else),
within a source, across a stage's sources and across stages; the held-out split stays clean; an
array of tasks gives the data one task gives."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import demo_docs, write_jsonl

from pipeline.cli import main
from pipeline.data.shards import is_heldout, load_shard, read_source_manifest

RECIPE = """\
name: dedup
tokenizer: {tokenizer}
model: {{init: {{hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128}}}}
seq_len: 64
batch: {{micro: 2, global: 8}}
data:
  dir: {data}
  heldout: {heldout}
  dedup: {dedup}
stages:
  - name: first
    schedule: {{max_lr: 1.0e-3}}
    sources:
      - {{name: web, path: {tmp}/web}}
      - {{name: books, path: {tmp}/books.jsonl{books_extra}}}
  - name: second
    schedule: {{max_lr: 1.0e-3}}
    sources:
      - {{name: news, path: {tmp}/news.jsonl}}
"""


def near(text: str, k: int = 0) -> str:
    """A near copy: one word in the middle replaced (about 0.95 Jaccard over 5-word shingles)."""
    words = text.split()
    words[len(words) // 2 + k] = f"zebra{k}"
    return " ".join(words)


def exact(text: str) -> str:
    """A copy that differs only in case and spacing (the same normalised text)."""
    return "  " + text.upper().replace(" ", "   ") + "\n"


def long_docs(name: str, count: int) -> list[str]:
    """The first `count` demo documents of at least 100 words (a one-word change keeps Jaccard >= 0.9)."""
    texts = [r["text"][:1500] for r in demo_docs(name, 3 * count)]
    return [t for t in texts if len(t.split()) >= 100][:count]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> Path:
    """web (2 files): 20 originals + 3 exact + 3 near copies of its own; books: 10 originals + 2 exact
    + 2 near copies of web; news (stage 2): 10 originals + 2 near copies of web + 1 exact copy of books."""
    tmp = tmp_path_factory.mktemp("corpora")
    en, de, code = long_docs("en", 20), long_docs("de", 10), long_docs("code", 10)
    (tmp / "web").mkdir()
    write_jsonl(tmp / "web" / "a.jsonl", [{"text": t} for t in en[:10] + [exact(en[0]), near(en[1])]])
    write_jsonl(tmp / "web" / "b.jsonl", [{"text": t} for t in en[10:] + [exact(en[2]), exact(en[12]), near(en[3]),
                                                                           near(en[14])]])
    write_jsonl(tmp / "books.jsonl", [{"text": t} for t in [exact(en[4])] + de + [near(en[5]), exact(en[6]),
                                                                                 near(en[7], 1)]])
    write_jsonl(tmp / "news.jsonl", [{"text": t} for t in code + [near(en[8], 2), near(en[9], 3), exact(de[0])]])
    return tmp


def prepare(tmp: Path, corpora: Path, dedup: str, data: str = "data", heldout: float = 0.0,
            books_extra: str = "", *extra) -> Path:
    from conftest import TOKENIZER

    recipe = tmp / f"{data}.yaml"
    recipe.write_text(RECIPE.format(tokenizer=TOKENIZER, data=tmp / data, heldout=heldout, dedup=dedup,
                                    tmp=corpora, books_extra=books_extra))
    assert main(["prepare", str(recipe), "--quiet", *map(str, extra)]) == 0
    return tmp / data


def docs(folder: Path, split: str = "train") -> list[tuple]:
    manifest = read_source_manifest(folder)
    shards = manifest["shards"] if split == "train" else manifest["heldout"]["shards"]
    out = []
    for s in shards:
        values, offsets = load_shard(str(folder / s["file"]), s["sha256"])
        out += [tuple(values[offsets[d]:offsets[d + 1]].tolist()) for d in range(len(offsets) - 1)]
    return out


def test_planted_duplicates_are_removed_within_and_across_sources_and_stages(tmp_path, corpora, capsys):
    data = prepare(tmp_path, corpora, "{method: minhash, threshold: 0.8}")
    got = {name: read_source_manifest(data / name) for name in ("web", "books", "news")}
    assert {n: (m["documents"], m["dedup"]["exact"], m["dedup"]["near"], m["dedup"]["against"])
            for n, m in got.items()} == {
        "web": (20, 3, 3, {"web": 6}),
        "books": (10, 2, 2, {"web": 4}),
        "news": (10, 1, 2, {"books": 1, "web": 2}),
    }
    out = capsys.readouterr().out
    assert "dedup: 1 exact + 2 near duplicate(s) removed (kept copy in books: 1, web: 2)" in out
    assert main(["check", str(tmp_path / "data.yaml")]) == 0
    assert "dedup: 1 exact + 2 near duplicate(s) removed" in capsys.readouterr().out


def test_scope_and_method_settings_change_what_is_removed(tmp_path, corpora):
    data = prepare(tmp_path, corpora, "{method: exact, across_stages: false}")
    web, news = read_source_manifest(data / "web"), read_source_manifest(data / "news")
    assert (web["documents"], web["dedup"]["exact"], web["dedup"]["near"]) == (23, 3, 0)
    assert (news["documents"], news["dedup"]["exact"], news["dedup"]["near"]) == (13, 0, 0)
    # A changed setting prepares again: now across stages, near copies too.
    data = prepare(tmp_path, corpora, "{method: minhash}")
    assert read_source_manifest(data / "news")["documents"] == 10
    # A source's own method: books kept whole, yet later sources are still tested against it.
    data = prepare(tmp_path, corpora, "{method: minhash}", "data", 0.0, ", dedup: {method: none}")
    books, news = read_source_manifest(data / "books"), read_source_manifest(data / "news")
    assert (books["documents"], books["dedup"]["exact"] + books["dedup"]["near"]) == (14, 0)
    assert news["dedup"]["against"] == {"books": 1, "web": 2}


def test_held_out_documents_have_no_near_duplicate_in_training(tmp_path, corpora):
    # books keeps its copies of web documents (method: none), so some pairs straddle the split by hash.
    en = long_docs("en", 20)
    pairs = [(en[5], near(en[5])), (en[6], exact(en[6])), (en[7], near(en[7], 1)), (en[4], exact(en[4]))]
    fraction = next(f for f in (0.4, 0.3, 0.2, 0.1, 0.45, 0.35, 0.25)
                    if any(is_heldout(a, f) != is_heldout(b, f) for a, b in pairs))
    data = prepare(tmp_path, corpora, "{method: minhash}", "held", fraction, ", dedup: {method: none}")
    straddling = sum(is_heldout(a, fraction) != is_heldout(b, fraction) for a, b in pairs)
    assert sum(read_source_manifest(data / n)["dedup"]["heldout_near_train"] for n in ("web", "books")) == straddling
    train = [frozenset(zip(d, d[1:])) for name in ("web", "books", "news") for d in docs(data / name)]
    for name in ("web", "books", "news"):
        for d in docs(data / name, "heldout"):  # token bigram overlap with every training document stays low
            h = frozenset(zip(d, d[1:]))
            assert max(len(h & t) / len(h | t) for t in train) < 0.5


def test_three_array_tasks_keep_the_same_documents_as_one(tmp_path, corpora):
    one = prepare(tmp_path, corpora, "{method: minhash}", "one", 0.2)
    for task in range(3):
        three = prepare(tmp_path, corpora, "{method: minhash}", "three", 0.2, "", "--shard-index", task,
                        "--num-shards", 3)
    for name in ("web", "books", "news"):
        a, b = read_source_manifest(one / name), read_source_manifest(three / name)
        assert a["dedup"] == b["dedup"]
        for split in ("train", "heldout"):
            assert sorted(docs(one / name, split)) == sorted(docs(three / name, split))


def test_a_source_dedup_without_data_dedup_is_a_recipe_error(tmp_path, corpora, capsys):
    recipe = tmp_path / "r.yaml"
    from conftest import TOKENIZER

    text = RECIPE.format(tokenizer=TOKENIZER, data=tmp_path / "d", heldout=0.0, dedup="{}", tmp=corpora,
                         books_extra=", dedup: {method: none}").replace("  dedup: {}\n", "")
    recipe.write_text(text)
    assert main(["check", str(recipe)]) == 2
    assert "stages[0].sources[1].dedup: needs data.dedup" in capsys.readouterr().err


def test_words_of_ascii_texts_are_the_regex_words():
    import re
    import unicodedata

    from pipeline.data.dedup import words

    texts = [r["text"] for name in ("en", "code", "de") for r in demo_docs(name, 40)] + ["Straße STRASSE ﬁne_1 x-y"]
    assert any(t.isascii() for t in texts) and not all(t.isascii() for t in texts)
    for t in texts:
        assert words(t) == re.findall(r"\w+", unicodedata.normalize("NFKC", t).casefold())
