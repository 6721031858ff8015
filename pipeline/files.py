"""Atomic writes: every file and folder Strata writes appears whole or not at all.

A file is written to a hidden temporary name beside its target, flushed to disk, then renamed
over the target (a rename within one filesystem is atomic). A folder is built under a temporary
name and swapped in the same way. A crash at any instant leaves the previous version, or nothing,
never a torn file; leftovers are hidden `.NAME.tmp-PID` entries that the next write replaces.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import StrataError


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def read_json(path: Path, what: str, fix: str = "", error: type[StrataError] = StrataError) -> Any:
    """A JSON file of a run or of prepared data (run.json, a checkpoint pointer, eval.json, a
    source manifest, scores' meta.json), with one error policy: None when the file does not exist;
    one error naming the file (`error`, a StrataError subclass) when it cannot be read or parsed,
    followed by `fix`, what the user can do about it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or str(e)
    else:
        try:
            return json.loads(text)
        except ValueError as e:
            why = str(e)
    raise error(f"{path}: unreadable {what} ({why})" + (f"; {fix}" if fix else "")) from None


def temp_dir_for(out: Path) -> Path:
    """An empty temporary folder beside `out`, to fill and then `replace_dir` into place."""
    tmp = Path(out).with_name(f".{Path(out).name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out`, replacing what was there."""
    out = Path(out)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def short_hash(value: Any, sort_keys: bool = False) -> str:
    """The 16-hex-digit fingerprint Strata stores (a stage's recipe hash, a source's data identity):
    sha256 of `value` as JSON (`str` for what JSON lacks, e.g. dates), first 16 hex digits. The
    same value always gives the same string, so fingerprints written by earlier runs still match."""
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=sort_keys, default=str).encode()).hexdigest()[:16]
