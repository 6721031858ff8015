#!/usr/bin/env python3
"""Build the Strata multi-domain demo corpus from locally installed, real text.

Reads (nothing is downloaded, nothing is generated):
  en.jsonl.zst        -- Python's reference text in the stdlib module
                         ``pydoc_data/topics.py`` (one document per topic) and the
                         English man pages of the Debian ``manpages`` package
                         (Linux man-pages project), rendered with groff.
  code.jsonl.zst      -- ``*.py`` files of the running interpreter's standard
                         library (``sysconfig.get_paths()["stdlib"]``), without test
                         suites, ``site-packages`` and files over 100 KB.
  de.jsonl.zst        -- German man pages of the Debian ``manpages-de`` package
                         (``apt-get install manpages-de``), rendered with groff.
  changelog.jsonl.zst -- Debian changelog entries from
                         ``/usr/share/doc/*/changelog.Debian.gz``, with ISO dates.

Selection is deterministic: sorted file lists, fixed budgets, evenly strided
subsets (no randomness).  Documents shorter than 200 characters are dropped.
Whitespace handling: trailing spaces are stripped from every line; rendered
man pages additionally have runs of blank lines collapsed to one.  Code is kept
byte-for-byte apart from trailing spaces.

Needs: groff (``groff-base``), dpkg, and either the ``zstandard`` Python package
or the ``zstd`` CLI.  Usage: ``python3 data_recipes/demo/build_corpus.py [OUTDIR]``.
"""
import concurrent.futures as cf
import email.utils
import glob
import gzip
import json
import math
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from collections import Counter
from pydoc_data.topics import topics as PYDOC_TOPICS

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
MIN_CHARS = 200
CODE_BUDGET = 6_000_000        # characters of Python source to keep
DE_BUDGET = 5_000_000          # characters of German man-page text to keep
CHANGELOG_YEAR_BUDGET = 350_000  # characters per calendar year of changelog entries
CHANGELOG_MAX_ENTRY = 30_000   # drop giant entries (imported upstream logs etc.)
# Tiny groff macro file: left-adjust (no justified double spaces), no hyphenation.
NOADJ_TMAC = ".rn ad strata-ad\n.de ad\n.strata-ad l\n..\n.ad l\n.nh\n.rn hy strata-hy\n.de hy\n..\n"


def rstrip_lines(text):
    return "\n".join(line.rstrip() for line in text.splitlines())


def stride_select(docs, budget):
    """Keep every k-th document (k fixed by the total size) so the kept set spans the input."""
    total = sum(len(d["text"]) for d in docs)
    k = max(1, math.ceil(total / budget))
    return docs[::k]


def write_jsonl_zst(name, docs):
    data = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    path = os.path.join(OUT, name)
    try:
        import zstandard
        blob = zstandard.ZstdCompressor(level=19).compress(data)
        with open(path, "wb") as f:
            f.write(blob)
    except ImportError:
        subprocess.run(["zstd", "-19", "-q", "-f", "-o", path], input=data, check=True)
    chars = sum(len(d["text"]) for d in docs)
    print(f"{name}: {len(docs)} docs, {chars} chars, {os.path.getsize(path)} bytes")


def dpkg_files(package, pattern):
    out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout
    return sorted(p for p in out.splitlines() if re.search(pattern, p))


def render_man(path, tmacdir):
    """Render one gzip'd man page to plain UTF-8 text with groff (None if not renderable)."""
    if os.path.islink(path):
        return None  # aliases of another page
    raw = gzip.open(path, "rb").read()
    if raw.lstrip().startswith(b".so "):
        return None  # redirect to another page
    cmd = ["groff", "-k", "-t", "-Tutf8", "-mandoc", "-M" + tmacdir, "-mnoadj",
           "-rLL=78n", "-P-cbou"]
    env = dict(os.environ, LC_ALL="C.UTF-8")
    res = subprocess.run(cmd, input=raw, capture_output=True, env=env)
    if res.returncode != 0:
        return None
    text = rstrip_lines(res.stdout.decode("utf-8", "replace"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def render_many(paths, source, license_):
    with tempfile.TemporaryDirectory() as tmacdir:
        with open(os.path.join(tmacdir, "noadj.tmac"), "w") as f:
            f.write(NOADJ_TMAC)
        with cf.ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as pool:
            texts = list(pool.map(lambda p: render_man(p, tmacdir), paths))
    return [{"text": t, "source": source, "path": p, "license": license_}
            for p, t in zip(paths, texts) if t and len(t) >= MIN_CHARS]


def build_en():
    docs = [{"text": rstrip_lines(PYDOC_TOPICS[k]).strip("\n"), "source": "python-pydoc-topics",
             "path": "pydoc_data/topics.py:" + k, "license": "PSF-2.0"}
            for k in sorted(PYDOC_TOPICS)]
    docs = [d for d in docs if len(d["text"]) >= MIN_CHARS]
    pages = dpkg_files("manpages", r"^/usr/share/man/man\d/.*\.gz$")
    docs += render_many(pages, "debian-manpages",
                        "Linux-man-pages (various free licenses, see /usr/share/doc/manpages/copyright)")
    write_jsonl_zst("en.jsonl.zst", docs)


def build_code():
    root = sysconfig.get_paths()["stdlib"]
    skip_dirs = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    files.sort(key=lambda p: os.path.relpath(p, root))
    docs = []
    for p in files:
        if os.path.getsize(p) > 100_000:
            continue
        with open(p, encoding="utf-8", errors="replace", newline="") as f:
            text = rstrip_lines(f.read())
        if len(text.strip()) >= MIN_CHARS:
            docs.append({"text": text + "\n", "source": "cpython-stdlib",
                         "path": "Lib/" + os.path.relpath(p, root), "license": "PSF-2.0"})
    write_jsonl_zst("code.jsonl.zst", stride_select(docs, CODE_BUDGET))


def build_de():
    pages = dpkg_files("manpages-de", r"^/usr/share/man/de/man\d/.*\.gz$")
    docs = render_many(pages, "debian-manpages-de", "GPL-3.0-or-later (translations; see "
                       "/usr/share/doc/manpages-de/copyright)")
    write_jsonl_zst("de.jsonl.zst", stride_select(docs, DE_BUDGET))


HEADER = re.compile(r"^(\S+) \(([^)]+)\) [^;]*;")
TRAILER = re.compile(r"^ -- .*?>\s+(.*?)\s*$")


def parse_changelog(path):
    """Yield (package, version, date_string, body) for each entry of a changelog.Debian.gz."""
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    entry = None
    for line in lines:
        m = HEADER.match(line)
        if m:
            if entry is not None:  # previous entry had no trailer line: no date
                yield entry[0], entry[1], "", ""
            entry = (m.group(1), m.group(2), [])
            continue
        m = TRAILER.match(line)
        if m and entry is not None:
            body = "\n".join(x.rstrip() for x in entry[2]).strip("\n")
            yield entry[0], entry[1], m.group(1), body
            entry = None
        elif entry is not None:
            entry[2].append(line)


def build_changelog():
    by_year, unparsable, seen = {}, 0, set()
    for path in sorted(glob.glob("/usr/share/doc/*/changelog.Debian.gz")):
        for package, version, datestr, body in parse_changelog(path):
            try:
                date = email.utils.parsedate_to_datetime(datestr).date()
            except (TypeError, ValueError, IndexError):
                unparsable += 1
                continue
            if (package, version, body) in seen:  # same source changelog in several doc dirs
                continue
            seen.add((package, version, body))
            if MIN_CHARS <= len(body) <= CHANGELOG_MAX_ENTRY:
                by_year.setdefault(date.year, []).append(
                    {"text": body, "date": date.isoformat(), "package": package,
                     "version": version, "source": "debian-changelog",
                     "path": path, "license": "per package, see /usr/share/doc/%s/copyright"
                     % path.split("/")[4]})
    print(f"changelog: dropped {unparsable} entries with unparsable dates")
    docs = []
    for year in sorted(by_year):
        entries = sorted(by_year[year], key=lambda d: (d["date"], d["package"], d["version"]))
        docs += stride_select(entries, CHANGELOG_YEAR_BUDGET)
    hist = Counter(d["date"][:4] for d in docs)
    print("changelog years:", " ".join(f"{y}:{n}" for y, n in sorted(hist.items())))
    write_jsonl_zst("changelog.jsonl.zst", docs)


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    build_en()
    build_code()
    build_de()
    build_changelog()
