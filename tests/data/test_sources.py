"""Readers: every input format on real demo text, malformed records counted per file, and the date slice."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import demo_docs, write_jsonl

from pipeline.data.sources import FIRST_LINES, ReadStats, parse_date, read_documents
from pipeline.errors import DataError
from pipeline.recipe.spec import Source


def read(path: Path, **kwargs) -> tuple[list[str], ReadStats]:
    stats = ReadStats()
    docs = list(read_documents(Source(name="s", path=str(path), **kwargs), stats))
    return docs, stats


@pytest.fixture(scope="module")
def en() -> list[dict]:
    return [{"text": r["text"][:2000]} for r in demo_docs("en", 12)]


def texts(records: list[dict], field: str = "text") -> list[str]:
    return [r[field] for r in records]


# ---------------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize("compress", [False, True], ids=["jsonl", "jsonl.zst"])
def test_jsonl_reader(tmp_path, en, compress):
    path = write_jsonl(tmp_path / ("a.jsonl.zst" if compress else "a.jsonl"), en, compress=compress)
    docs, stats = read(path)
    assert docs == texts(en)
    assert stats.documents == len(en) and stats.skipped_total == 0 and stats.out_of_range == 0


def test_jsonl_reader_with_another_text_field(tmp_path):
    records = [{"body": r["text"][:500], "text": 1} for r in demo_docs("code", 5)]
    docs, _ = read(write_jsonl(tmp_path / "c.jsonl", records), text_field="body")
    assert docs == texts(records, "body")


def test_jsonl_lines_with_crlf_and_unicode_survive(tmp_path):
    de = [r["text"][:800] for r in demo_docs("de", 5)]
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\r\n" for t in de).encode("utf-8")
    (tmp_path / "de.jsonl").write_bytes(data)
    docs, stats = read(tmp_path / "de.jsonl")
    assert docs == de and stats.skipped_total == 0


def test_parquet_reader_reads_every_row_group_in_order(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    records = demo_docs("changelog", 40)
    table = pa.table({"content": [r["text"] for r in records], "pkg": [r["package"] for r in records]})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=7)
    docs, stats = read(tmp_path / "c.parquet", text_field="content")
    assert docs == [r["text"] for r in records]
    assert stats.documents == 40


def test_parquet_null_text_is_skipped_with_its_row_number(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = [r["text"][:300] for r in demo_docs("en", 4)]
    pq.write_table(pa.table({"text": [good[0], None, good[1], good[2], None, good[3]]}), tmp_path / "n.parquet")
    docs, stats = read(tmp_path / "n.parquet")
    assert docs == good
    entry = stats.skipped[str(tmp_path / "n.parquet")]
    assert entry["count"] == 2
    assert sum((w["lines"] for w in entry["reasons"].values()), []) == [2, 5]


def test_parquet_without_the_text_column_is_an_error_naming_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet.*no column 'text'"):
        read(tmp_path / "b.parquet")


def test_txt_file_is_one_document(tmp_path, en):
    (tmp_path / "one.txt").write_text(en[0]["text"], encoding="utf-8")
    docs, stats = read(tmp_path / "one.txt")
    assert docs == [en[0]["text"]] and stats.documents == 1


def test_folder_of_txt_files_is_one_document_per_file_in_sorted_order(tmp_path, en):
    folder = tmp_path / "books"
    folder.mkdir()
    # written out of order: the reader must sort by name
    for name, i in (("c.txt", 2), ("a.txt", 0), ("b.txt", 1), ("d.txt", 3)):
        (folder / name).write_text(en[i]["text"], encoding="utf-8")
    (folder / "README.md").write_text("not a corpus file")
    docs, stats = read(folder)
    assert docs == texts(en[:4])
    assert stats.documents == 4


def test_folder_mixing_formats_reads_each_file_by_its_suffix(tmp_path, en):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "1.jsonl", en[:3])
    write_jsonl(folder / "2.jsonl.zst", en[3:6], compress=True)
    (folder / "3.txt").write_text(en[6]["text"])
    docs, _ = read(folder)
    assert docs == texts(en[:7])


def test_hf_dataset_saved_to_disk(tmp_path, en):
    datasets = pytest.importorskip("datasets")
    data = {"content": texts(en), "n": list(range(len(en)))}
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path / "ds"))
    docs, stats = read(tmp_path / "ds", text_field="content")
    assert docs == texts(en) and stats.documents == len(en)


def test_hf_dataset_dict_reads_the_requested_split(tmp_path, en):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts(en[:8])}),
                               "validation": datasets.Dataset.from_dict({"text": texts(en[8:])})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert read(tmp_path / "dd")[0] == texts(en[:8])  # split defaults to train
    assert read(tmp_path / "dd", split="validation")[0] == texts(en[8:])
    with pytest.raises(DataError, match=r"dd.*no split 'test'"):
        read(tmp_path / "dd", split="test")
    with pytest.raises(DataError, match=r"no column 'body'"):
        read(tmp_path / "dd", text_field="body")


def test_missing_path_unsupported_file_and_empty_folder_are_data_errors(tmp_path):
    with pytest.raises(DataError, match=r"nothing\.jsonl.*not found"):
        read(tmp_path / "nothing.jsonl")
    (tmp_path / "table.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"table\.csv: unsupported file type"):
        read(tmp_path / "table.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no .* files"):
        read(tmp_path / "empty")


def test_corrupt_zstd_is_a_data_error_naming_the_file(tmp_path):
    (tmp_path / "bad.jsonl.zst").write_bytes(b"this is not zstd at all" * 10)
    with pytest.raises(DataError, match=r"bad\.jsonl\.zst"):
        read(tmp_path / "bad.jsonl.zst")


def test_truncated_zstd_is_not_silently_shortened(tmp_path):
    records = [{"text": r["text"][:1500]} for r in demo_docs("en", 120)]
    data = write_jsonl(tmp_path / "full.jsonl.zst", records, compress=True).read_bytes()
    (tmp_path / "cut.jsonl.zst").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.zst"):
        read(tmp_path / "cut.jsonl.zst")


# ---------------------------------------------------------------------------------------------
# Malformed records

GOOD = [r["text"][:400] for r in demo_docs("en", 4)]


def malformed_lines() -> list[str]:
    return [
        json.dumps({"text": GOOD[0]}),        # 1
        '{"text": "unterminated',             # 2  bad JSON
        json.dumps({"text": GOOD[1]}),        # 3
        json.dumps({"title": "no text"}),     # 4  missing field
        "",                                   # 5  blank: ignored, not counted
        json.dumps({"text": 42}),             # 6  not a string
        json.dumps(["a", "list"]),            # 7  not an object
        json.dumps({"text": GOOD[2]}),        # 8
        "null",                               # 9  not an object
        json.dumps({"text": None}),           # 10 not a string
        json.dumps({"text": GOOD[3]}),        # 11
    ]


def test_malformed_jsonl_lines_are_skipped_and_counted_with_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", malformed_lines())
    docs, stats = read(path)
    assert docs == GOOD
    assert stats.documents == 4 and stats.skipped_total == 6
    entry = stats.skipped[str(path)]
    assert entry["count"] == 6
    by_kind = {}
    for reason, why in entry["reasons"].items():
        lines = why["lines"]
        assert why["count"] == len(lines)
        kind = ("json" if "JSON" in reason else "missing" if "missing" in reason
                else "object" if "object" in reason else "string" if "string" in reason else reason)
        by_kind.setdefault(kind, []).extend(lines)
    assert by_kind == {"json": [2], "missing": [4], "string": [6, 10], "object": [7, 9]}
    summary = stats.summary()
    assert "bad.jsonl" in summary and "skipped 6" in summary
    for line in (2, 4, 6, 7, 9, 10):
        assert str(line) in summary


def test_skips_are_counted_per_file(tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": GOOD[0]}, "{oops", {"text": GOOD[1]}])
    write_jsonl(folder / "b.jsonl.zst", [{"text": 3}, {"text": GOOD[2]}, {"text": GOOD[3]}, {"x": 1}], compress=True)
    docs, stats = read(folder)
    assert docs == GOOD
    a, b = str(folder / "a.jsonl"), str(folder / "b.jsonl.zst")
    assert set(stats.skipped) == {a, b}
    assert stats.skipped[a]["count"] == 1 and sum((w["lines"] for w in stats.skipped[a]["reasons"].values()), []) == [2]
    assert stats.skipped[b]["count"] == 2 and sorted(sum((w["lines"] for w in stats.skipped[b]["reasons"].values()), [])) == [1, 4]
    summary = stats.summary()
    assert "a.jsonl: skipped 1" in summary and "b.jsonl.zst: skipped 2" in summary


def test_only_the_first_line_numbers_are_kept_but_every_skip_is_counted(tmp_path):
    lines = [json.dumps({"text": GOOD[0]})] + ["{broken"] * (FIRST_LINES + 4)
    path = write_jsonl(tmp_path / "many.jsonl", lines)
    docs, stats = read(path)
    assert docs == [GOOD[0]]
    entry = stats.skipped[str(path)]
    assert entry["count"] == FIRST_LINES + 4
    (kept,) = entry["reasons"].values()
    assert kept["lines"] == list(range(2, 2 + FIRST_LINES))
    assert kept["count"] == FIRST_LINES + 4
    assert "..." in stats.summary() and f"skipped {FIRST_LINES + 4}" in stats.summary()


def test_summary_adds_no_ellipsis_when_every_line_is_listed(tmp_path):
    path = write_jsonl(tmp_path / "two.jsonl", [{"text": GOOD[0]}, "{bad", {"nope": 1}])
    _, stats = read(path)
    assert stats.skipped_total == 2
    assert "..." not in stats.summary(), stats.summary()


@pytest.mark.parametrize("lines,bad_line", [
    (lambda: malformed_lines(), 2),
    (lambda: [json.dumps({"text": GOOD[0]}), "", json.dumps({"body": "x"})], 3),
    (lambda: [json.dumps({"text": GOOD[0]}), json.dumps({"text": ["a"]})], 2),
    (lambda: ["[1, 2]"], 1),
], ids=["bad-json", "missing-field", "not-a-string", "not-an-object"])
def test_on_error_fail_raises_naming_file_and_line(tmp_path, lines, bad_line):
    path = write_jsonl(tmp_path / "strict.jsonl", lines())
    with pytest.raises(DataError) as info:
        read(path, on_error="fail")
    assert f"strict.jsonl:{bad_line}:" in str(info.value)
    assert "'s'" in str(info.value)  # the source's name


def test_on_error_fail_in_zst_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = write_jsonl(tmp_path / "s.jsonl.zst", [{"text": GOOD[0]}, {"text": GOOD[1]}, {"text": 7}], compress=True)
    with pytest.raises(DataError, match=r"s\.jsonl\.zst:3:"):
        read(path, on_error="fail")
    pq.write_table(pa.table({"text": [GOOD[0], None]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet:2:"):
        read(tmp_path / "p.parquet", on_error="fail")


# ---------------------------------------------------------------------------------------------
# Date slices

DATED = [
    ("2019-12-31", "out"), ("2020-01-01", "in"), ("2020-06-30T23:59:59Z", "in"), ("2020-12-31", "in"),
    ("2021-01-01", "out"), ("2020-07-15 08:00:00", "in"), ("1999-02-03", "out"),
]


def dated_records() -> list[dict]:
    base = [r["text"][:200] for r in demo_docs("changelog", len(DATED) + 4)]
    recs = [{"text": base[i], "date": d} for i, (d, _) in enumerate(DATED)]
    n = len(DATED)
    recs += [{"text": base[n], "date": "last tuesday"},          # unparsable
             {"text": base[n + 1]},                               # no date
             {"text": base[n + 2], "date": None},                 # null date
             {"text": base[n + 3], "date": 20200505}]             # not a date
    return recs


def test_date_slice_keeps_exactly_the_inclusive_range(tmp_path):
    recs = dated_records()
    path = write_jsonl(tmp_path / "dated.jsonl", recs)
    docs, stats = read(path, date_field="date", from_=dt.date(2020, 1, 1), to=dt.date(2020, 12, 31))
    assert docs == [r["text"] for r, (_, where) in zip(recs, DATED) if where == "in"]
    assert stats.documents == 4
    assert stats.out_of_range == 3
    # bad dates are counted as skipped records, not silently dropped or counted as out of range
    entry = stats.skipped[str(path)]
    assert entry["count"] == 4
    assert sorted(sum((w["lines"] for w in entry["reasons"].values()), [])) == [8, 9, 10, 11]
    assert "unparsable date" in stats.summary() and "last tuesday" in stats.summary()


def test_open_ended_date_slices(tmp_path):
    recs = dated_records()[: len(DATED)]
    path = write_jsonl(tmp_path / "dated.jsonl", recs)
    after, s1 = read(path, date_field="date", from_=dt.date(2020, 7, 1))
    assert after == [recs[3]["text"], recs[4]["text"], recs[5]["text"]] and s1.out_of_range == 4
    before, s2 = read(path, date_field="date", to=dt.date(2020, 1, 1))
    assert before == [recs[0]["text"], recs[1]["text"], recs[6]["text"]] and s2.out_of_range == 4


def test_date_slice_on_a_parquet_date_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    days = [dt.date(2020, 1, 1), dt.date(2020, 3, 1), None, dt.date(2021, 3, 1)]
    body = [r["text"][:200] for r in demo_docs("changelog", 4)]
    pq.write_table(pa.table({"text": body, "day": pa.array(days, pa.date32())}), tmp_path / "d.parquet")
    docs, stats = read(tmp_path / "d.parquet", date_field="day", from_=dt.date(2020, 2, 1), to=dt.date(2020, 12, 31))
    assert docs == [body[1]]
    assert stats.out_of_range == 2 and stats.skipped_total == 1


def test_txt_has_no_date_field(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(DataError, match=r"a\.txt.*date"):
        read(tmp_path / "a.txt", date_field="date", from_=dt.date(2020, 1, 1))


def test_parse_date_forms():
    assert parse_date("2021-03-04") == dt.date(2021, 3, 4)
    assert parse_date("2021-03-04T05:06:07+02:00") == dt.date(2021, 3, 4)
    assert parse_date(dt.datetime(2021, 3, 4, 23, 59)) == dt.date(2021, 3, 4)
    assert parse_date(dt.date(2021, 3, 4)) == dt.date(2021, 3, 4)
    assert parse_date("March 4th") is None and parse_date(None) is None and parse_date(2021) is None


@pytest.fixture(scope="module")
def changelog(tmp_path_factory) -> tuple[Path, list[dict]]:
    records = demo_docs("changelog")
    path = write_jsonl(tmp_path_factory.mktemp("changelog") / "changelog.jsonl", records)
    return path, records


def test_yearly_slices_of_the_changelog_are_disjoint_and_cover_everything(changelog):
    path, records = changelog
    years = sorted({int(r["date"][:4]) for r in records})
    assert len(years) >= 5
    everything, union = Counter(r["text"] for r in records), Counter()
    for year in range(years[0], years[-1] + 1):
        docs, stats = read(path, date_field="date", from_=dt.date(year, 1, 1), to=dt.date(year, 12, 31))
        assert stats.skipped_total == 0
        expected = [r["text"] for r in records if r["date"][:4] == str(year)]
        assert docs == expected, year
        assert stats.documents + stats.out_of_range == len(records)
        union.update(docs)
    assert union == everything  # each document in exactly one year: disjoint and covering
    assert sum(union.values()) == len(records)


def test_consecutive_multi_year_slices_partition_the_changelog(changelog):
    path, records = changelog
    cuts = [dt.date(1990, 1, 1), dt.date(2010, 1, 1), dt.date(2019, 6, 1), dt.date(2030, 1, 1)]
    total = Counter()
    for lo, hi in zip(cuts, cuts[1:]):
        docs, stats = read(path, date_field="date", from_=lo, to=hi - dt.timedelta(days=1))
        assert docs == [r["text"] for r in records if lo <= dt.date.fromisoformat(r["date"][:10]) < hi]
        assert docs, (lo, hi)
        total.update(docs)
    assert total == Counter(r["text"] for r in records)
