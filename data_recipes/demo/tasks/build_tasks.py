#!/usr/bin/env python3
"""Build the demo's downstream task: pick the true continuation of a held-out passage among four.

One lm-evaluation-harness multiple-choice task per domain of the demo (en, code, de), made from the
demo corpus's own held-out documents (the ones `strata prepare` sets aside with the demo's
`data.heldout: 0.02`, never trained on). An item is a passage of about CONTEXT characters, cut at
whitespace, and four continuations of about CONTINUATION characters: the true one and three taken
at the same kind of cut from other held-out documents of the same domain. Whitespace is kept as it
is (code indentation matters), so the task YAMLs use `target_delimiter: ""`.

Run from the repository root (deterministic; the output is checked in):
    python data_recipes/demo/tasks/build_tasks.py
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from pipeline.data.shards import is_heldout  # noqa: E402  (the split prepare uses)
from pipeline.data.sources import ReadStats, read_documents  # noqa: E402
from pipeline.recipe.spec import Source  # noqa: E402

HERE = Path(__file__).resolve().parent
DOMAINS = {"en": "en.jsonl.zst", "code": "code.jsonl.zst", "de": "de.jsonl.zst"}
HELDOUT = 0.02  # data_recipes/demo.yaml's data.heldout
ITEMS = 40
CONTEXT, CONTINUATION = 300, 80


def cut(text: str, at: int) -> int:
    """The first whitespace at or after `at` (a cut between words), or -1."""
    for i in range(at, len(text)):
        if text[i].isspace():
            return i
    return -1


def passage(text: str, rng: random.Random) -> tuple[str, str] | None:
    if len(text) < CONTEXT + 3 * CONTINUATION:
        return None
    start = cut(text, rng.randrange(0, len(text) - CONTEXT - 2 * CONTINUATION))
    middle = cut(text, start + CONTEXT) if start >= 0 else -1
    end = cut(text, middle + CONTINUATION) if middle >= 0 else -1
    if end < 0 or not text[start + 1:middle].strip() or not text[middle:end].strip():
        return None
    return text[start + 1:middle], text[middle:end]


def build(domain: str, file: str, rng: random.Random) -> list[dict]:
    source = Source(name=domain, path=str(HERE.parent / file))
    docs = [t for t in read_documents(source, ReadStats()) if is_heldout(t, HELDOUT)]
    items: list[dict] = []
    while len(items) < ITEMS:
        i = rng.randrange(len(docs))
        true = passage(docs[i], rng)
        others = [j for j in range(len(docs)) if j != i]
        wrong = [passage(docs[j], rng) for j in rng.sample(others, min(3, len(others)))]
        if true is None or len(wrong) < 3 or any(w is None for w in wrong):
            continue
        choices = [true[1]] + [w[1] for w in wrong]
        order = list(range(4))
        rng.shuffle(order)
        items.append({"context": true[0], "choices": [choices[k] for k in order], "label": order.index(0)})
    return items


def main() -> None:
    rng = random.Random(1234)
    for domain, file in DOMAINS.items():
        items = build(domain, file, rng)
        out = HERE / f"continuation_{domain}.jsonl"
        out.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items))
        print(f"{out}: {len(items)} items")


if __name__ == "__main__":
    main()
