"""Readers: documents out of jsonl, jsonl.zst, parquet, txt and saved Hugging Face datasets.

A reader yields the text of each document in a fixed order (sorted file names, file order
inside a file) so that preparing the same input twice gives the same shards. Malformed records
(bad JSON, missing field, wrong type, unparsable date) are never dropped silently: they are
counted per file with the first few line numbers, and `on_error: fail` turns the first one into
an error naming the file and the line.

A source with `template:` or `format:` (pipeline/data/templates.py) renders each record to its
text instead of reading `text_field`; a record that fails to render is one more malformed record.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.data.templates import RenderError, renderer
from pipeline.errors import DataError
from pipeline.recipe.spec import Source

FIRST_LINES = 5  # line numbers of the first skipped records kept per file and reason

SUFFIXES = (".jsonl", ".jsonl.zst", ".parquet", ".txt")


@dataclass
class ReadStats:
    """What a reader saw: documents kept, documents outside the date slice, and skipped records."""

    documents: int = 0
    out_of_range: int = 0
    bytes_read: int = 0  # input bytes consumed so far (compressed bytes for .zst), for progress bars
    skipped: dict[str, dict[str, Any]] = field(default_factory=dict)  # file -> {count, reasons: {reason: [lines]}}

    @property
    def skipped_total(self) -> int:
        return sum(v["count"] for v in self.skipped.values())

    def skip(self, file: str, line: int, reason: str) -> None:
        entry = self.skipped.setdefault(file, {"count": 0, "reasons": {}})
        entry["count"] += 1
        why = entry["reasons"].setdefault(reason, {"count": 0, "lines": []})
        why["count"] += 1
        if len(why["lines"]) < FIRST_LINES:
            why["lines"].append(line)

    def summary(self) -> str:
        parts = []
        for file, entry in self.skipped.items():
            reasons = "; ".join(
                f"{r} x{w['count']} (line {', '.join(map(str, w['lines']))}{', ...' if w['count'] > len(w['lines']) else ''})"
                for r, w in entry["reasons"].items())
            parts.append(f"{file}: skipped {entry['count']} record(s): {reasons}")
        return "\n".join(parts)


def _zstd_lines(raw: BinaryIO, file: Path) -> Iterator[bytes]:
    """Lines of a zstd-compressed file (one or more frames). A stream cut inside a frame is an
    error: zstandard's stream reader would end quietly and lose the rest of the file."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    frame, fed, pending = dctx.decompressobj(), False, b""
    while chunk := raw.read(1 << 20):
        while chunk:
            fed = True
            pending += frame.decompress(chunk)
            if frame.eof:  # the next frame starts in what is left of the chunk
                chunk, frame, fed = frame.unused_data, dctx.decompressobj(), False
            else:
                chunk = b""
        *lines, pending = pending.split(b"\n")
        yield from lines
    if fed and not frame.eof:
        raise DataError(f"{file}: truncated zstd stream (the file ends inside a frame)")
    if pending:
        yield pending


def parse_date(value: Any) -> dt.date | None:
    """ISO 8601 dates and datetimes (strings, date objects, pandas/arrow timestamps); None if unparsable."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return dt.date.fromisoformat(text[:10])
        except ValueError:
            try:
                return dt.datetime.fromisoformat(text).date()
            except ValueError:
                return None
    if hasattr(value, "to_pydatetime"):
        return value.to_pydatetime().date()
    return None


class _Reader:
    """Turns raw records into texts, applying the text field, the date slice and the error policy."""

    def __init__(self, source: Source, stats: ReadStats):
        self.source = source
        self.stats = stats
        self.render = renderer(source)

    def bad(self, file: Path, line: int, reason: str) -> None:
        if self.source.on_error == "fail":
            raise DataError(f"{file}:{line}: {reason} (source {self.source.name!r}, on_error: fail)")
        self.stats.skip(str(file), line, reason)

    def record(self, record: Any, file: Path, line: int) -> str | None:
        src = self.source
        if not isinstance(record, dict):
            self.bad(file, line, "record is not an object")
            return None
        if self.render is not None:
            try:
                text = self.render(record)
            except RenderError as e:
                self.bad(file, line, str(e))
                return None
        elif src.text_field not in record:
            self.bad(file, line, f"missing field {src.text_field!r}")
            return None
        else:
            text = record[src.text_field]
        if not isinstance(text, str):
            self.bad(file, line, f"field {src.text_field!r} is {type(text).__name__}, not a string")
            return None
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800") from JSON: no tokenizer accepts it
            self.bad(file, line, "text is not valid Unicode (lone surrogate)")
            return None
        if src.date_field is not None:
            if src.date_field not in record or record[src.date_field] is None:
                self.bad(file, line, f"missing date field {src.date_field!r}")
                return None
            date = parse_date(record[src.date_field])
            if date is None:
                self.bad(file, line, f"unparsable date {str(record[src.date_field])[:40]!r}")
                return None
            if (src.from_ and date < src.from_) or (src.to and date > src.to):
                self.stats.out_of_range += 1
                return None
        self.stats.documents += 1
        return text

    def jsonl(self, file: Path, lines: Iterable[bytes], position: Callable[[], int]) -> Iterator[str]:
        base = self.stats.bytes_read
        for n, line in enumerate(lines, start=1):
            if n % 64 == 0:
                self.stats.bytes_read = base + position()
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                self.bad(file, n, f"bad JSON ({e.msg})")
                continue
            except UnicodeDecodeError:
                self.bad(file, n, "invalid UTF-8")
                continue
            text = self.record(record, file, n)
            if text is not None:
                yield text
        self.stats.bytes_read = base + position()

    def file(self, file: Path) -> Iterator[str]:
        name = file.name
        if name.endswith(".jsonl"):
            with open(file, "rb") as f:
                yield from self.jsonl(file, f, f.tell)
        elif name.endswith(".jsonl.zst"):
            import zstandard

            with open(file, "rb") as raw:
                try:
                    yield from self.jsonl(file, _zstd_lines(raw, file), raw.tell)
                except zstandard.ZstdError as e:
                    raise DataError(f"{file}: corrupt zstd stream ({e})") from None
        elif name.endswith(".parquet"):
            yield from self.parquet(file)
        elif name.endswith(".txt"):
            if self.source.date_field is not None:
                raise DataError(f"{file}: plain text has no date field; remove date_field from source {self.source.name!r}")
            if self.render is not None:
                raise DataError(f"{file}: plain text has no fields to render; remove template/format from source "
                                f"{self.source.name!r}")
            self.stats.bytes_read += file.stat().st_size
            try:
                text = file.read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                self.bad(file, 1, f"invalid UTF-8 at byte {e.start}")
                return
            self.stats.documents += 1
            yield text
        else:
            raise DataError(f"{file}: unsupported file type (expected one of {', '.join(SUFFIXES)})")

    def parquet(self, file: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(file)
        except Exception as e:  # pyarrow raises several types for a broken file
            raise DataError(f"{file}: not a readable parquet file ({e})") from None
        columns = [self.source.text_field] + ([self.source.date_field] if self.source.date_field else [])
        if self.render is not None:  # a template may use any column
            columns = columns[1:]
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise DataError(f"{file}: no column {missing[0]!r} (columns: {', '.join(pf.schema_arrow.names)})")
        columns = None if self.render is not None else columns
        row, size, base = 0, file.stat().st_size, self.stats.bytes_read
        rows = max(1, pf.metadata.num_rows)
        for batch in pf.iter_batches(batch_size=4096, columns=columns):
            self.stats.bytes_read = base + size * row // rows
            for record in batch.to_pylist():
                row += 1
                text = self.record(record, file, row)
                if text is not None:
                    yield text
        self.stats.bytes_read = base + size

    def hf_dataset(self, folder: Path) -> Iterator[str]:
        import pyarrow as pa

        try:
            yield from self._hf_rows(folder)
        except (pa.ArrowException, OSError) as e:  # a truncated or corrupt .arrow file of the saved dataset
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            where = _broken_arrow_file(folder) or folder
            raise DataError(f"{where}: source {self.source.name!r}: the saved dataset cannot be read ({why[:200]}); "
                            "it is truncated or corrupt: save the dataset again") from None

    def _hf_rows(self, folder: Path) -> Iterator[str]:
        import datasets

        ds = datasets.load_from_disk(str(folder))
        if isinstance(ds, datasets.DatasetDict):
            if self.source.split not in ds:
                raise DataError(f"{folder}: no split {self.source.split!r} (splits: {', '.join(ds)})")
            ds = ds[self.source.split]
        if self.render is None and self.source.text_field not in ds.column_names:
            raise DataError(f"{folder}: no column {self.source.text_field!r} (columns: {', '.join(ds.column_names)})")
        size, base, rows = sum(p.stat().st_size for p in input_files(folder)), self.stats.bytes_read, max(1, len(ds))
        for row, record in enumerate(ds, start=1):
            if row % 256 == 0:
                self.stats.bytes_read = base + size * row // rows
            text = self.record(record, folder, row)
            if text is not None:
                yield text


def _broken_arrow_file(folder: Path) -> Path | None:
    """The first .arrow file of a saved dataset that does not read whole (to name it in the error)."""
    import pyarrow as pa

    for file in sorted(Path(folder).rglob("*.arrow")):
        try:
            with pa.memory_map(str(file)) as source:
                pa.ipc.open_stream(source).read_all()
        except (pa.ArrowException, OSError):
            return file
    return None


def is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                              or (path / "state.json").exists())


def input_files(path: Path) -> list[Path]:
    """The files a source path stands for: itself, or the supported files under a folder, sorted."""
    if path.is_file():
        return [path]
    if is_hf_dataset(path):
        return sorted(p for p in path.rglob("*") if p.is_file())
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))


def part_inputs(source: Source) -> list[Path]:
    """The inputs of a source, one per part: its files, or the saved HF dataset as a whole."""
    path = Path(source.path)
    if not path.exists():
        raise DataError(f"{path}: not found (source {source.name!r})")
    return [path] if is_hf_dataset(path) else input_files(path)


def read_documents(source: Source, stats: ReadStats) -> Iterator[str]:
    """Every document's text, in a fixed order; counts land in `stats`."""
    path = Path(source.path)
    if not path.exists():
        raise DataError(f"{path}: not found (source {source.name!r})")
    reader = _Reader(source, stats)
    if is_hf_dataset(path):
        yield from reader.hf_dataset(path)
        return
    files = input_files(path)
    if not files:
        raise DataError(f"{path}: no {', '.join(SUFFIXES)} files in this folder (source {source.name!r})")
    for file in files:
        yield from reader.file(file)


def read_file_documents(source: Source, file: Path, stats: ReadStats) -> Iterator[str]:
    """The documents of one input file of a source (a part of the source, see pipeline/data/parts.py)."""
    reader = _Reader(source, stats)
    if is_hf_dataset(file):
        return reader.hf_dataset(file)
    return reader.file(file)


def preview(source: Source, limit: int = 1000) -> tuple[str | None, ReadStats]:
    """The first document of a source and the counts over its first `limit` records, skipping bad
    ones whatever `on_error` says (for `strata check`: one rendered example, failures counted)."""
    import dataclasses

    stats = ReadStats()
    first = None
    for text in read_documents(dataclasses.replace(source, on_error="skip"), stats):
        first = text if first is None else first
        if stats.documents + stats.skipped_total + stats.out_of_range >= limit:
            break
    return first, stats
