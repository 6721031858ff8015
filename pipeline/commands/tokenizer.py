"""`strata tokenizer train|extend`: train a sentencepiece model, or extend one for a new language.

Both read their `--input` files (jsonl, jsonl.zst, parquet, txt files or folders) through
`input_texts`, the same readers `strata prepare` uses.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import StrataError

HELP = "train a sentencepiece model, or extend one with pieces for a new language"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    p = actions.add_parser("train", help="train a BPE sentencepiece model with byte fallback")
    p.add_argument("--input", nargs="+", required=True, help="jsonl / jsonl.zst / parquet / txt files or folders")
    p.add_argument("--text-field", default="text")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="path of the .model file to write")
    p.set_defaults(func=train)
    p = actions.add_parser("extend", help="append pieces learned on a new language; existing ids are unchanged")
    p.add_argument("base", help="the sentencepiece .model to extend")
    p.add_argument("--input", nargs="+", required=True, help="the new language's text: jsonl / jsonl.zst / parquet / txt")
    p.add_argument("--text-field", default="text")
    p.add_argument("--add", type=int, required=True, help="how many pieces to add")
    p.add_argument("--out", required=True, help="path of the extended .model file")
    p.set_defaults(func=extend)


def input_texts(paths: list[str], text_field: str) -> Iterator[str]:
    """The documents of every `--input` path, in order; a missing path is one error naming it."""
    from pipeline.data.sources import ReadStats, read_documents
    from pipeline.recipe.spec import Source

    for i, path in enumerate(paths):
        if not Path(path).exists():
            raise StrataError(f"{path}: not found")
        yield from read_documents(Source(name=f"input{i}", path=str(path), text_field=text_field), ReadStats())


def train(args: argparse.Namespace) -> int:
    from pipeline.data.tokenizer import load_tokenizer, train_sentencepiece

    lines = (line for text in input_texts(args.input, args.text_field) for line in text.splitlines() if line.strip())
    out = train_sentencepiece(lines, Path(args.out), args.vocab_size)
    tok = load_tokenizer(out)
    print(f"wrote {out}: vocab {tok.vocab_size}, eos id {tok.eos_id}, hash {tok.content_hash}")
    return 0


def extend(args: argparse.Namespace) -> int:
    from pipeline.data.tokenizer import extend_sentencepiece, load_tokenizer

    base = Path(args.base)
    if not base.is_file():
        raise StrataError(f"{base}: not found")
    old = load_tokenizer(base)  # a file that is not a sentencepiece model is one error naming it
    docs = list(input_texts(args.input, args.text_field))
    result = extend_sentencepiece(base, docs, args.add, Path(args.out))
    new = load_tokenizer(result.out)
    before = sum(len(ids) for ids in old.encode_batch(docs))
    after = sum(len(ids) for ids in new.encode_batch(docs))
    print(f"wrote {result.out}: vocab {result.base_size} -> {new.vocab_size} ({result.added} new pieces; "
          f"ids 0..{result.base_size - 1} unchanged)")
    print(f"on the input ({len(docs):,} docs): {before:,} -> {after:,} tokens "
          f"({(before - after) / max(len(docs), 1):,.1f} fewer per document, {1 - after / max(before, 1):.1%} fewer)")
    return 0
