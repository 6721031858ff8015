"""`strata COMMAND` (also `python -m pipeline COMMAND`): one function per command.

User errors (StrataError) are printed as one line (or one line per recipe problem) and turned
into a non-zero exit code; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.errors import RecipeError, StrataError


def cmd_check(args: argparse.Namespace) -> int:
    from pipeline.plan import build_plan
    from pipeline.recipe import load_recipe, recipe_schema
    from pipeline.shards import prepared_manifests, prepared_tokens

    if args.schema:
        print(json.dumps(recipe_schema(), indent=2))
        return 0
    if args.recipe is None:
        raise StrataError("strata check: give a RECIPE (or --schema)")
    recipe = load_recipe(args.recipe)
    manifests = prepared_manifests(recipe)
    tokens = {name: m["tokens"] for name, m in manifests.items()}
    plans = build_plan(recipe, tokens)
    tokens_per_step = recipe.batch.global_ * recipe.seq_len
    print(f"recipe {recipe.name!r} ({recipe.file}): {len(plans)} stage(s), seq_len {recipe.seq_len}, "
          f"global batch {recipe.batch.global_} x {recipe.seq_len} = {tokens_per_step:,} tokens/step, "
          f"micro batch {recipe.batch.micro}")
    warnings, errors = [], []
    for plan in plans:
        stage = recipe.stages[plan.index]
        budget = f"{plan.tokens:,} tokens" if plan.tokens else "one pass over its sources (run strata prepare to size it)"
        steps = f"{plan.steps:,} steps (warmup {plan.warmup_steps})" if plan.steps else "steps unknown until prepared"
        print(f"\nstage {plan.index} {plan.name!r}: {budget}, {steps}, "
              f"lr {plan.min_lr:g} -> {plan.max_lr:g} -> {plan.min_lr:g} ({plan.decay})")
        before = recipe.tokenizer_at(plan.index - 1) if plan.index > 0 else recipe.tokenizer
        if recipe.tokenizer_at(plan.index) != before:
            print(f"  {vocabulary_change(recipe, plan.index, before)}")
        several = len(recipe.tokenizers()) > 1  # replayed sources are read in this stage's tokens
        passes = plan.passes(prepared_tokens(recipe, plan.index) if several else tokens)
        for c in plan.mixture:
            held = tokens.get(c.source)
            p = passes[c.source]
            origin = f"replay of {c.replay_of!r}{' (resample)' if c.resample else ''}" if c.replay_of else "own"
            used = f"{round(plan.tokens * c.share):,}" if plan.tokens else "?"
            held_txt = f"of {held:,} prepared" if held is not None else "(not prepared)"
            pass_txt = f"{p:.2f} passes" if p is not None else "passes unknown"
            print(f"  {c.source:<16} {c.share:6.1%} {origin:<30} {used:>12} tokens {held_txt:<22} {pass_txt}")
            if p is not None and p > recipe.data.max_passes:
                message = (f"stages[{plan.index}]: {'replay of ' if c.replay_of else ''}source {c.source!r} "
                           f"would be read {p:.1f} times (more than data.max_passes = {recipe.data.max_passes:g})")
                # Replaying a small old source many times silently overfits it: refuse. An own
                # source read often is a choice of the recipe: warn.
                (errors if c.replay_of else warnings).append(message)
        extras = [k for k in ("selection", "expand") if getattr(stage, k) is not None]
        if extras:
            print(f"  also: {', '.join(extras)}")
    if manifests:
        print("\nprepared sources:")
        for name, m in sorted(manifests.items()):
            notes = [f"{m['out_of_range']:,} outside the date slice"] if m["out_of_range"] else []
            if m["skipped_total"]:
                notes.append(f"{m['skipped_total']:,} malformed record(s) skipped")
                warnings.append(f"source {name!r}: {m['skipped_total']:,} malformed record(s) skipped "
                                f"(details in {recipe.data_dir / name / 'manifest.json'})")
            print(f"  {name:<20} {m['documents']:>9,} docs {m['tokens']:>13,} tokens"
                  f"  held out {m['heldout']['documents']:,} docs" + (f"  ({'; '.join(notes)})" if notes else ""))
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if errors:
        raise RecipeError(recipe.file, errors)
    return 0


def vocabulary_change(recipe, index: int, before: str, sample: int = 200) -> str:
    """'tokenizer: 8000 -> 9500 pieces; ...saves N% tokens per document on <the stage's sources>'.

    Measured on the first `sample` documents of each of the stage's own sources, encoded with the
    tokenizer before the stage and with the stage's.
    """
    import itertools

    from pipeline.sources import ReadStats, read_documents
    from pipeline.tokenizer import cached_tokenizer

    old, new = cached_tokenizer(before), cached_tokenizer(recipe.tokenizer_at(index))
    stage = recipe.stages[index]
    texts = [t for src in stage.sources for t in itertools.islice(read_documents(src, ReadStats()), sample)]
    old_tokens = sum(len(x) for x in old.encode_batch(texts))
    new_tokens = sum(len(x) for x in new.encode_batch(texts))
    docs = max(len(texts), 1)
    saving = 1 - new_tokens / max(old_tokens, 1)
    names = ", ".join(src.name for src in stage.sources)
    return (f"tokenizer: {old.vocab_size} -> {new.vocab_size} pieces ({Path(new.path).name}); the new tokenizer "
            f"saves {saving:.1%} tokens per document on {names} ({old_tokens / docs:,.1f} -> "
            f"{new_tokens / docs:,.1f} tokens/doc over {len(texts):,} sampled documents)")


def cmd_schema(args: argparse.Namespace) -> int:
    from pipeline.recipe import recipe_schema

    text = json.dumps(recipe_schema(), indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from pipeline.recipe import load_recipe
    from pipeline.shards import prepare_source, source_folder, source_tokenizers
    from pipeline.tokenizer import load_tokenizer

    if not 0 <= args.shard_index < args.num_shards:
        raise StrataError(f"--shard-index must be in [0, {args.num_shards}), got {args.shard_index}")
    recipe = load_recipe(args.recipe)
    # One unit of work per (source, tokenizer): a stage's `tokenizer:` needs every source again.
    needed = source_tokenizers(recipe)
    units = [(src, tok) for src in sorted(recipe.all_sources(), key=lambda s: s.name) for tok in needed[src.name]]
    mine = [u for k, u in enumerate(units) if k % args.num_shards == args.shard_index]
    tokenizers = {tok: load_tokenizer(tok) for _, tok in mine}
    several = len(recipe.tokenizers()) > 1
    print(f"preparing {len(mine)} of {len(units)} source(s){' x tokenizer' if several else ''} into "
          f"{recipe.data_dir} with {args.workers} worker(s)")
    skipped_any = False
    for src, tok in mine:
        r = prepare_source(src, recipe, tokenizers[tok], workers=args.workers, progress=not args.quiet)
        state = "up to date" if r.skipped_up_to_date else "prepared"
        label = source_folder(recipe, src.name, tokenizers[tok]).name if several else r.source
        print(f"  {label:<20} {state:<11} {r.documents:>9,} docs {r.tokens:>13,} tokens  "
              f"{r.skipped_records} record(s) skipped")
        if r.skipped_records and not r.skipped_up_to_date:
            skipped_any = True
            for line in r.summary.splitlines():
                print(f"    {line}", file=sys.stderr)
    if skipped_any:
        print("warning: some records were skipped (see above); `on_error: fail` makes them fatal", file=sys.stderr)
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from pipeline.recipe import Source
    from pipeline.sources import ReadStats, read_documents
    from pipeline.tokenizer import load_tokenizer, train_sentencepiece

    def lines():
        for i, path in enumerate(args.input):
            src = Source(name=f"input{i}", path=str(path), text_field=args.text_field)
            if not Path(path).exists():
                raise StrataError(f"{path}: not found")
            for text in read_documents(src, ReadStats()):
                for line in text.splitlines():
                    if line.strip():
                        yield line

    out = train_sentencepiece(lines(), Path(args.out), args.vocab_size)
    tok = load_tokenizer(out)
    print(f"wrote {out}: vocab {tok.vocab_size}, eos id {tok.eos_id}, hash {tok.content_hash}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.dry_run:
        from pipeline.dry_run import dry_run_command

        return dry_run_command(args)
    from pipeline.trainer import train_command

    return train_command(args)


def cmd_score(args: argparse.Namespace) -> int:
    from pipeline.scoring import score_command

    return score_command(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.evaluate import eval_command

    return eval_command(args)


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import write_report

    print(write_report(Path(args.run_dir)))
    return 0


def cmd_expand(args: argparse.Namespace) -> int:
    from pipeline.expand import expand_command

    return expand_command(args)


def cmd_tokenizer_extend(args: argparse.Namespace) -> int:
    from pipeline.expand import tokenizer_extend_command

    return tokenizer_extend_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description="Continual pretraining, stage by stage.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="validate a recipe and print its plan")
    p.add_argument("recipe", nargs="?")
    p.add_argument("--schema", action="store_true", help="print the recipe's JSON Schema instead")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("schema", help="write the recipe's JSON Schema")
    p.add_argument("--out", help="file to write (default: stdout)")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("prepare", help="tokenize every source into shards (incremental)")
    p.add_argument("recipe")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--shard-index", type=int, default=0, help="this task's index in a SLURM array")
    p.add_argument("--num-shards", type=int, default=1, help="tasks in the SLURM array (sources are split among them)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="run (or resume) all stages")
    p.add_argument("recipe")
    p.add_argument("--run-dir", help="run folder (default runs/<recipe name>)")
    p.add_argument("--dry-run", action="store_true",
                   help="print world size, batch arithmetic, steps per stage and the DeepSpeed config; train nothing")
    p.add_argument("--world-size", type=int, help="with --dry-run: plan for this many ranks (default: WORLD_SIZE or 1)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("score", help="RHO-1: precompute the reference model's token losses for a stage")
    p.add_argument("recipe")
    p.add_argument("--stage", required=True, help="the stage whose selection is scored")
    p.add_argument("--run-dir", help="run folder holding a reference stage's export (default runs/<recipe name>)")
    p.add_argument("--block-steps", type=int, default=None, help="optimizer steps per score file (default: ~16M tokens)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("eval", help="held-out loss per domain for each finished stage that lacks it")
    p.add_argument("run_dir")
    p.add_argument("--reference", help="from-scratch reference for FWD: an eval.json or {measure: {domain: value}}")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="report.md and PNG plots of a run")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    tok = sub.add_parser("tokenizer", help="train a sentencepiece model").add_subparsers(dest="action", required=True)
    p = tok.add_parser("train", help="train a BPE sentencepiece model with byte fallback")
    p.add_argument("--input", nargs="+", required=True, help="jsonl / jsonl.zst / parquet / txt files or folders")
    p.add_argument("--text-field", default="text")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="path of the .model file to write")
    p.set_defaults(func=cmd_tokenizer_train)
    p = tok.add_parser("extend", help="append pieces learned on a new language; existing ids are unchanged")
    p.add_argument("base", help="the sentencepiece .model to extend")
    p.add_argument("--input", nargs="+", required=True, help="the new language's text: jsonl / jsonl.zst / parquet / txt")
    p.add_argument("--text-field", default="text")
    p.add_argument("--add", type=int, required=True, help="how many pieces to add")
    p.add_argument("--out", required=True, help="path of the extended .model file")
    p.set_defaults(func=cmd_tokenizer_extend)

    p = sub.add_parser("expand", help="grow a Hugging Face Llama, function-preserving (LLaMA Pro depth or width)")
    p.add_argument("model_dir")
    p.add_argument("--add-layers", type=int, help="LLaMA Pro: identity blocks to insert")
    p.add_argument("--hidden-size", type=int, help="width: the new hidden size (a multiple of head_dim)")
    p.add_argument("--intermediate-size", type=int, help="width: the new MLP width (default unchanged)")
    p.add_argument("--noise", type=float, default=0.0, help="width: zero-sum jitter of split weights")
    p.add_argument("--seed", type=int, default=0, help="width: seed of the new dimensions' reader weights")
    p.add_argument("--out", required=True, help="folder to write")
    p.set_defaults(func=cmd_expand)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StrataError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
