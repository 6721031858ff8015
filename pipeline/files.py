"""Atomic writes: every file and folder Strata writes appears whole or not at all.

A file is written to a hidden temporary name beside its target, flushed to disk, then renamed
over the target (a rename within one filesystem is atomic). A folder is built under a temporary
name and swapped in the same way. A crash at any instant leaves the previous version, or nothing,
never a torn file; leftovers are hidden `.NAME.tmp-PID` entries that the next write replaces.

A file with several writers (eval.json: `strata train` and `strata eval` on one run folder) is
changed only through `update_json_locked`: an exclusive `fcntl.flock` on a hidden `.NAME.lock`
beside it, the file re-read under the lock, the writer's change applied to what is on disk, the
result written atomically, the lock released. Two writers then never lose each other's results.

Names that become paths (a stage's `stages/NN-NAME`, a source's `DATA_DIR/NAME`) are checked by
`name_problem` when the recipe is read, and every such path is built through `inside`, which
refuses one that would leave its root: nothing Strata writes lands outside the run folder or the
data dir, whatever a name holds.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import StrataError

NAME_CHARS = re.compile(r"[^\W_][\w.-]*")  # a letter or digit, then letters, digits, '_', '.', '-'
NAME_MAX = 64


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a folder name that Strata writes (None when it can)."""
    if not isinstance(name, str):
        return None  # a wrong type is reported by the recipe's type check
    if len(name) > NAME_MAX:
        return f"must be at most {NAME_MAX} characters, got {len(name)}"
    if not NAME_CHARS.fullmatch(name):
        return (f"must start with a letter or digit and hold only letters, digits, '_', '.' and '-' "
                f"(it names a folder): {name!r}")
    return None


def inside(root: Path, path: Path) -> Path:
    """`path`, after checking that it stays inside `root` (no '..' or absolute part takes it out)."""
    base = os.path.abspath(root)
    full = os.path.abspath(os.path.join(base, path))
    if os.path.commonpath([base, full]) != base or full == base:
        raise StrataError(f"{path}: would be written outside {root}; a name in the recipe holds a path")
    return Path(path)


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


def update_json_locked(path: Path, change: Callable[[dict], dict], what: str, fix: str = "") -> dict:
    """Apply `change` to the JSON object at `path` (an empty dict when there is none) under an
    exclusive lock on `.NAME.lock`, write the result atomically and return it. Every writer of a
    shared file goes through here, so each sees the others' last write (merge on write)."""
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    try:
        handle = open(lock, "a")
    except OSError as e:
        raise StrataError(f"{lock}: cannot create the lock of {path.name} ({e.strerror or e})") from None
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # waits for the other writer; released on close or death
        doc = change(read_json(path, what, fix) or {})
        write_json_atomic(path, doc)
    return doc


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
