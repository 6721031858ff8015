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

Leftovers. A writer killed mid-write leaves its temporary entry behind (`.NAME.tmp-PID` here, a
prepared source's `.tmp-NAME-PID` folder); the PID differs next time, so no later write replaces
it. `remove_leftovers` deletes them, and only the process that owns the folder calls it (rank 0
of `strata train` holding train.lock; `strata prepare` holding the data dir's lock exclusively),
so nothing another writer is still filling is ever removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

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


ATOMIC_LEFTOVER = re.compile(r"\..+\.(?:tmp|old)-\d+")  # `.NAME.tmp-PID`, `.NAME.old-PID` (below)
SOURCE_LEFTOVER = re.compile(r"\.(?:tmp|old)-.+-\d+")  # `.tmp-SOURCE-PID`, `.old-SOURCE-PID` (data/shards.py)


def remove_leftovers(folder: Path, patterns: tuple[re.Pattern, ...] = (ATOMIC_LEFTOVER,)) -> list[str]:
    """Delete the entries of `folder` whose names match `patterns` (a killed writer's temporaries);
    their names. Only for the folder's owner: see the module docstring."""
    removed = []
    for entry in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else ():
        if any(p.fullmatch(entry.name) for p in patterns):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def lock_folder(path: Path, exclusive: bool, busy: str) -> IO[str]:
    """Take an `fcntl.flock` on the lock file `path` without waiting, held until the returned file is
    closed or the process ends (the kernel drops it even on SIGKILL: never a stale lock). Shared
    locks coexist; an exclusive one excludes every other. When taken: one error, `busy` followed by
    the exclusive holder's host and pid, which it wrote into the file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError as e:
        raise StrataError(f"{path}: cannot create the lock file ({e.strerror or e})") from None
    try:
        fcntl.flock(handle.fileno(), (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        who = handle.read().strip() or "a strata process"
        handle.close()
        raise StrataError(f"{path.parent}: {busy} ({who})") from None
    if exclusive:
        handle.seek(0)
        handle.truncate()
        handle.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
    return handle


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


WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def file_sha256(path: Path) -> str:
    """The sha256 of a file (hex)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def safetensors_problem(file: Path) -> str | None:
    """Why `file` is not a whole safetensors file (a truncated copy, a torn write), None when its
    header reads and every tensor it lists lies inside the file. Reads the header only."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = json.loads(f.read(length)) if 0 < length <= size - 8 else None
    except (OSError, ValueError) as e:
        return f"unreadable safetensors file ({getattr(e, 'strerror', None) or e})"
    if not isinstance(header, dict):
        return "not a safetensors file, or truncated (its header does not read)"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + length + max(ends, default=0) > size:
        return f"truncated: {size:,} bytes, its header lists {8 + length + max(ends):,}"
    return None


def model_folder_problem(folder: Path) -> str | None:
    """Why `folder` is not a Hugging Face model folder that can be loaded (None when it is): a
    config.json with a model_type, and weights (whole, for single-file safetensors)."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"no such folder: {folder}"
    config = folder / "config.json"
    try:
        doc = json.loads(config.read_text())
    except FileNotFoundError:
        return f"not a Hugging Face model folder (no config.json): {folder}"
    except (OSError, ValueError) as e:
        return f"{config}: unreadable ({getattr(e, 'strerror', None) or e})"
    if not isinstance(doc, dict) or "model_type" not in doc:
        return f"{config}: not a model's config (no model_type): {folder}"
    weights = [folder / w for w in WEIGHTS if (folder / w).is_file()]
    if not weights:
        return f"no weights in {folder} (none of {', '.join(WEIGHTS)})"
    if weights[0].name == "model.safetensors" and (why := safetensors_problem(weights[0])):
        return f"{weights[0]}: {why}"
    return None


def short_hash(value: Any, sort_keys: bool = False) -> str:
    """The 16-hex-digit fingerprint Strata stores (a stage's recipe hash, a source's data identity):
    sha256 of `value` as JSON (`str` for what JSON lacks, e.g. dates), first 16 hex digits. The
    same value always gives the same string, so fingerprints written by earlier runs still match."""
    return hashlib.sha256(json.dumps(value, sort_keys=sort_keys, default=str).encode()).hexdigest()[:16]
