"""`strata check RECIPE`: validate a recipe and print its plan per stage."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.errors import RecipeError, StrataError

HELP = "validate a recipe and print its plan"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?")
    parser.add_argument("--schema", action="store_true", help="print the recipe's JSON Schema instead")


def run(args: argparse.Namespace) -> int:
    from pipeline.commands.recipe_file import open_recipe, recipe_plan
    from pipeline.data.shards import prepared_manifests, small_heldout_sets
    from pipeline.recipe.load import recipe_schema
    from pipeline.recipe.plan import tokens_per_step

    if args.schema:
        print(json.dumps(recipe_schema(), indent=2))
        return 0
    if args.recipe is None:
        raise StrataError("strata check: give a RECIPE (or --schema)")
    recipe = open_recipe(args.recipe)
    manifests = prepared_manifests(recipe)
    tokens = {name: m["tokens"] for name, m in manifests.items()}
    planned = recipe_plan(recipe)
    plans = planned.plans
    step_tokens = tokens_per_step(recipe)
    print(f"recipe {recipe.name!r} ({recipe.file}): {len(plans)} stage(s), seq_len {recipe.seq_len}, "
          f"global batch {recipe.batch.global_} x {recipe.seq_len} = {step_tokens:,} tokens/step, "
          f"micro batch {recipe.batch.micro}")
    warnings, errors = list(planned.problems.warnings), list(planned.problems.errors)  # train refuses these too
    if recipe.pretraining:
        print("\npretraining (learned before stage 0; replayable, evaluated as old domains): " + ", ".join(
            f"{s.name} ({tokens[s.name]:,} tokens)" if s.name in tokens else f"{s.name} (not prepared)"
            for s in recipe.pretraining))
    for plan in plans:
        print_stage(recipe, plan, tokens, planned.tokens_at(plan.index), errors)
    warnings += print_prepared(recipe, manifests)
    warnings += small_heldout_sets(recipe, manifests)
    if manifests:
        warnings += print_contamination(recipe)
    if any(s.distill or s.regularize or s.selection for s in recipe.stages):
        from pipeline.commands.dry_run import resolved_world_size
        from pipeline.train.memory import memory_lines

        world_size, origin = resolved_world_size(None)
        print(f"\nmemory per rank of the extra model copies ({world_size} rank(s): {origin}):")
        lines, more = memory_lines(recipe, world_size)
        for line in lines:
            print(f"  {line}")
        warnings += more
    warnings += print_templates(recipe)
    if recipe.evaluation.tasks:  # lm-eval installed, every task loadable offline (before any training)
        from pipeline.evaluate.harness import task_problems

        errors += task_problems(recipe)
        print(f"\ndownstream tasks after every stage: {', '.join(recipe.evaluation.tasks)}")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if errors:
        raise RecipeError(recipe.file, errors)
    return 0


def print_stage(recipe, plan, tokens: dict[str, int], read: dict[str, int], errors: list[str]) -> None:
    """One stage of the plan: budget, steps, LR, vocabulary change, mixture with the passes each
    source is read (`read`: prepared tokens as the stage reads them), what trains, the defences."""
    from pipeline.recipe.forgetting import describe_defences
    from pipeline.recipe.generated import GENERATED

    stage = recipe.stages[plan.index]
    budget = f"{plan.tokens:,} tokens" if plan.tokens else "one pass over its sources (run strata prepare to size it)"
    steps = f"{plan.steps:,} steps (warmup {plan.warmup_steps})" if plan.steps else "steps unknown until prepared"
    # numbered from 1, as training and --dry-run number them (the key paths stay 0-based)
    print(f"\nstage {plan.index + 1}/{len(recipe.stages)} {plan.name!r}: {budget}, {steps}, "
          f"lr {plan.min_lr:g} -> {plan.max_lr:g} -> {plan.min_lr:g} ({plan.decay})")
    before = recipe.tokenizer_at(plan.index - 1) if plan.index > 0 else recipe.tokenizer
    if recipe.tokenizer_at(plan.index) != before:
        print(f"  {vocabulary_change(recipe, plan.index, before)}")
    passes = plan.passes(read)
    for c in plan.mixture:
        held = tokens.get(c.source)
        p = passes[c.source]
        origin = f"replay of {c.replay_of!r}{' (resample)' if c.resample else ''}" if c.replay_of else "own"
        used = f"{round(plan.tokens * c.share):,}" if plan.tokens else "?"
        held_txt = f"of {held:,} prepared" if held is not None else "(not prepared)"
        if c.replay_of == GENERATED:  # written before the stage trains (its line below)
            origin, held_txt = "generated replay", "(generated)"
        pass_txt = f"{p:.2f} passes" if p is not None else "passes unknown"
        print(f"  {c.source:<16} {c.share:6.1%} {origin:<30} {used:>12} tokens {held_txt:<22} {pass_txt}")
    print(f"  {trainable_line(recipe, plan.index, errors)}")
    extras = [k for k in ("selection", "expand", "adapter") if getattr(stage, k) is not None]
    if extras:
        print(f"  also: {', '.join(extras)}")
    for line in describe_defences(stage):  # distill / regularize / merge
        print(f"  {line}")
    if stage.replay is not None and stage.replay.generate is not None:
        print(f"  {generation_line(recipe, plan)}")


def print_prepared(recipe, manifests: dict) -> list[str]:
    """The prepared sources (documents, tokens, held out, skipped, duplicates); warnings for skipped records."""
    from pipeline.commands.prepare import dedup_line

    warnings: list[str] = []
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
            if "dedup" in m:
                print(f"    {dedup_line(m['dedup'])}")
    return warnings


def print_contamination(recipe) -> list[str]:
    """Each evaluation set's share of items sharing an n-gram with the training data up to each
    stage (the downstream tasks too, when the harness can load them); returns the warnings."""
    from pipeline.data.contamination import contamination, contamination_lines
    from pipeline.evaluate.decontaminate import recipe_task_items

    section = contamination(recipe, recipe_task_items(recipe))
    lines, warnings = contamination_lines(section)
    if lines:
        print(f"\ncontamination ({section['ngram']}-word n-grams shared with the training data up to each stage):")
        for line in lines:
            print(f"  {line}")
    return warnings


def print_templates(recipe) -> list[str]:
    """One rendered example per templated source and the records of its first 1000 that failed to
    render; returns warnings for the failures."""
    from pipeline.data.sources import preview

    templated = [s for s in recipe.all_sources() if s.template is not None or s.format is not None]
    warnings = []
    if templated:
        print("\ntemplated sources (first record as rendered):")
    for src in templated:
        example, stats = preview(src)
        read = stats.documents + stats.skipped_total
        print(f"  {src.name}: {stats.skipped_total:,} of the first {read:,} record(s) failed to render or were malformed")
        shown = example if example is None or len(example) <= 600 else example[:600] + " [...]"
        print("    " + ("(no record rendered)" if shown is None else shown.replace("\n", "\n    ")))
        if stats.skipped_total:
            warnings.append(f"source {src.name!r}: {stats.skipped_total:,} of its first {read:,} record(s) "
                            f"failed to render:\n  " + stats.summary().replace("\n", "\n  "))
    return warnings


def trainable_line(recipe, index: int, errors: list[str]) -> str:
    """'N of M parameters train (x%)' for stage `index`: its model built on the meta device (no
    memory, no weights), with the stage's expansion, adapter and `trainable:` patterns applied;
    an adapter target or trainable pattern that matches nothing goes to `errors`."""
    from pipeline.model.skeleton import stage_skeleton
    from pipeline.model.trainable import describe

    try:
        return describe(stage_skeleton(recipe, index))
    except RecipeError as e:
        errors += e.problems
        return "trainable: see the error below"


def generation_line(recipe, plan) -> str:
    """The generated replay of a stage: its share, its tokens (written, or the budget) and the cost
    of generating it (forward FLOPs of the stage's model, built on the meta device)."""
    import torch

    from pipeline.data.shards import PreparedSource
    from pipeline.data.tokenizer import cached_tokenizer
    from pipeline.model.expand import build_stage_model
    from pipeline.recipe.generated import generated_source, generation_cost

    name = generated_source(plan.name)
    share = sum(c.share for c in plan.mixture if c.source == name)
    tok = cached_tokenizer(recipe.tokenizer_at(plan.index))
    with torch.device("meta"):
        model, _ = build_stage_model(recipe, max(plan.index - 1, 0), tok.vocab_size, tok.eos_id)
    params = sum(p.numel() for p in model.parameters())
    written = PreparedSource.find(recipe, name, recipe.tokenizer_at(plan.index))
    done = f"{written.manifest['tokens']:,} tokens written" if written else "not generated yet"
    return (f"generated replay ({done}; {share:.1%} of the stage): "
            f"{generation_cost(recipe.stages[plan.index].replay.generate, params)}")


def vocabulary_change(recipe, index: int, before: str, sample: int = 200) -> str:
    """'tokenizer: 8000 -> 9500 pieces; ...saves N% tokens per document on <the stage's sources>'.

    Measured on the first `sample` documents of each of the stage's own sources, encoded with the
    tokenizer before the stage and with the stage's.
    """
    import itertools

    from pipeline.data.sources import ReadStats, read_documents
    from pipeline.data.tokenizer import cached_tokenizer

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
