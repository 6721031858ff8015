"""`strata merge A B --method linear|slerp|ties --weight W --out DIR`: merge two Hugging Face folders."""

from __future__ import annotations

import argparse

from pipeline.model.merge import METHODS

HELP = "merge two Hugging Face folders (linear, slerp, ties; with mergekit)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("earlier", help="the model merged back towards (A)")
    parser.add_argument("trained", help="the trained model (B); --weight is its share")
    parser.add_argument("--method", choices=METHODS, default="linear")
    parser.add_argument("--weight", type=float, default=0.5, help="share of B: linear gives (1 - w) * A + w * B")
    parser.add_argument("--out", required=True, help="folder to write")


def run(args: argparse.Namespace) -> int:
    from pipeline.model.merge import merge_folders

    out = merge_folders(args.earlier, args.trained, args.method, args.weight, args.out)
    print(f"merged {args.earlier} and {args.trained} ({args.method}, weight {args.weight:g} on the second) into {out}")
    return 0
