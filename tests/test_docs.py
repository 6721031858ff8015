"""The manual as a user reads it: README.md and every page of docs/ (a glob, so new pages count).

Every ```yaml block is a recipe or a fragment of one (a stage, a list of stages, a `train:` or
`evaluation:` block...) and must pass the real loader once placed inside the minimal recipe below;
only the files it names may be missing (a user's corpora and checkpoints are not in the repo).
A block that is not a recipe says so on the line before its fence: `<!-- not a recipe -->`.
Every `strata COMMAND` the pages name must be a command of the CLI whose `--help` exits 0, and
every `--option` written after it (in the same code span or line) one of its options.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.errors import RecipeError
from pipeline.recipe.load import parse_recipe
from pipeline.recipe.spec import Recipe, Stage
from pipeline.recipe.typed_yaml import config_fields, yaml_key
from pipeline.recipe.yaml_file import read_yaml

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NOT_A_RECIPE = "<!-- not a recipe -->"
MISSING_FILE = ("file or folder not found", "no Hugging Face model folder", "no such folder")  # paths a user has, the repo not

# The recipe a fragment is placed in: the smallest valid one, one stage of the demo's English.
BASE = """\
name: docs-fragment
tokenizer: tokenizers/demo.model
model:
  init: {hidden_size: 64, num_layers: 2, num_heads: 2, intermediate_size: 128}
seq_len: 64
batch: {micro: 1, global: 1}
stages:
  - name: english
    sources: [{name: english-text, path: data_recipes/demo/en.jsonl.zst}]
    schedule: {max_lr: 1.0e-3}
"""
RECIPE_KEYS = {yaml_key(f) for f in config_fields(Recipe)}
STAGE_KEYS = {yaml_key(f) for f in config_fields(Stage)}


def yaml_blocks(page: Path) -> list[tuple[int, str]]:
    """(line of the fence, text) of every ```yaml block of `page` not marked as no recipe."""
    lines, blocks = page.read_text().splitlines(), []
    for i, line in enumerate(lines):
        if line.strip() in ("```yaml", "```yml"):
            before = next((x.strip() for x in reversed(lines[:i]) if x.strip()), "")
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            if before != NOT_A_RECIPE:
                blocks.append((i + 1, "\n".join(lines[i + 1:end]) + "\n"))
    return blocks


def _with_sources(stage: dict) -> dict:
    """A stage of a fragment, given a source of its own and a schedule where the fragment shows none."""
    if not isinstance(stage, dict):
        return stage
    source = {"name": f"{stage.get('name')}-text", "path": "data_recipes/demo/de.jsonl.zst"}
    return {"sources": [source], "schedule": {"max_lr": 1.0e-3}, **stage}


def as_recipe(fragment: object, base: dict) -> dict:
    """The fragment placed inside `base`: a whole recipe as it is, recipe keys over the base's,
    a stage (or a stage's keys, or a list of stages) after the base's stage."""
    stages = base["stages"]
    if isinstance(fragment, list):
        return {**base, "stages": stages + [_with_sources(s) for s in fragment]}
    assert isinstance(fragment, dict), f"neither a mapping nor a list: {fragment!r}"
    if "name" in fragment and "stages" in fragment:
        return fragment
    if set(fragment) <= RECIPE_KEYS:
        fragment = {**fragment, "stages": [_with_sources(s) for s in fragment.get("stages", stages)]}
        return {**base, **fragment}
    unknown = set(fragment) - STAGE_KEYS
    assert not unknown, f"keys of neither a recipe nor a stage: {sorted(unknown)}"
    return {**base, "stages": stages + [_with_sources({"name": "fragment", **fragment})]}


def _block_params() -> list:
    params = []
    for page in PAGES:
        for line, text in yaml_blocks(page):
            params.append(pytest.param(page, line, text, id=f"{page.relative_to(REPO)}:{line}"))
    return params


@pytest.mark.parametrize(("page", "line", "text"), _block_params())
def test_every_yaml_block_of_the_manual_is_a_valid_recipe_or_fragment(page, line, text, tmp_path):
    (tmp_path / "block.yaml").write_text(text)
    (tmp_path / "base.yaml").write_text(BASE)
    raw = as_recipe(read_yaml(tmp_path / "block.yaml"), read_yaml(tmp_path / "base.yaml"))
    try:
        parse_recipe(raw, f"{page.name}:{line}", REPO, prepared=True)
    except RecipeError as e:
        real = [p for p in e.problems if not any(m in p for m in MISSING_FILE)]
        assert not real, f"{page.relative_to(REPO)}, the yaml block at line {line}:\n" + "\n".join(real)


def test_the_block_check_catches_a_misspelt_key_and_a_bad_value(tmp_path):
    """The check above can fail: a fragment with a typo or an out-of-range value is refused."""
    (tmp_path / "base.yaml").write_text(BASE)
    base = read_yaml(tmp_path / "base.yaml")
    for text, problem in (("replay: {ratio: 0.1, form: [english]}\n", "stages[1].replay.form: unknown key"),
                          ("train: {grad_clip: -1}\n", "train.grad_clip: must be >= 0")):
        (tmp_path / "block.yaml").write_text(text)
        with pytest.raises(RecipeError) as e:
            parse_recipe(as_recipe(read_yaml(tmp_path / "block.yaml"), base), "block", REPO, prepared=True)
        assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_a_yaml_block_marked_as_no_recipe_is_skipped_and_only_it(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"{NOT_A_RECIPE}\n\n```yaml\ntask: mine\n```\n\ntext\n\n```yaml\ntrain: {{compile: true}}\n```\n")
    assert yaml_blocks(page) == [(9, "train: {compile: true}\n")]


def test_every_page_of_docs_is_in_the_site_navigation_and_every_entry_is_a_page():
    """mkdocs.yml's nav lists exactly the pages of docs/ (read as YAML: the tests need no MkDocs)."""
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    listed = [next(iter(entry.values())) for entry in config["nav"]]
    assert sorted(listed) == sorted(p.name for p in PAGES if p.parent.name == "docs")


def test_the_manual_has_yaml_blocks_on_every_subject_page():
    pages_with_yaml = {page.name for page in PAGES if yaml_blocks(page)}
    assert {"README.md", "recipe.md", "data.md", "forgetting.md", "growing.md", "training.md"} <= pages_with_yaml


# --------------------------------------------------------------------------------------------
# `strata COMMAND` in the prose, tables and shell blocks.

COMMAND = re.compile(r"\bstrata ([a-z][a-z_-]*)(?: ([a-z][a-z_-]*))?")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def _subcommands(parser) -> dict:
    """name -> parser of each subcommand of `parser` (empty when it has none)."""
    if parser._subparsers is None:
        return {}
    return dict(parser._subparsers._group_actions[0].choices)


def _snippets(text: str) -> list[str]:
    """The code a page shows: its inline code spans and the lines of its fenced blocks (comments cut)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            lines.append(line.split(" #")[0])
    return re.findall(r"`([^`\n]+)`", text) + lines


def named_commands() -> dict[tuple[str, ...], set[str]]:
    """Every command the pages name, ('train',) or ('tokenizer', 'extend'), with the --options
    written after it in the same code span or line."""
    commands = _subcommands(build_parser())
    named: dict[tuple[str, ...], set[str]] = {}
    for page in PAGES:
        for first, second in COMMAND.findall(page.read_text()):
            nested = _subcommands(commands[first]) if first in commands else {}
            named.setdefault((first, second) if nested and second else (first,), set())
        for snippet in _snippets(page.read_text()):
            matches = list(COMMAND.finditer(snippet))
            for i, match in enumerate(matches):
                first, second = match.groups()
                nested = _subcommands(commands[first]) if first in commands else {}
                command = (first, second) if nested and second else (first,)
                tail = snippet[match.end():matches[i + 1].start() if i + 1 < len(matches) else None]
                named.setdefault(command, set()).update(FLAG.findall(tail))
    return named


def command_problems(named: dict[tuple[str, ...], set[str]]) -> list[str]:
    """What is wrong with the commands the pages name: no such command, or no such option."""
    parser, problems = build_parser(), []
    top = {o for action in parser._actions for o in action.option_strings}  # --debug
    for command, flags in sorted(named.items()):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            with pytest.raises(SystemExit) as exit_:
                parser.parse_args([*command, "--help"])
        if exit_.value.code != 0:
            problems.append(f"`strata {' '.join(command)}`: no such command")
            continue
        sub = _subcommands(parser)[command[0]]
        sub = _subcommands(sub)[command[1]] if len(command) > 1 else sub
        unknown = flags - top - {o for action in sub._actions for o in action.option_strings}
        problems += [f"`strata {' '.join(command)}`: no option {flag}" for flag in sorted(unknown)]
    return problems


def test_every_strata_command_the_manual_names_exists_with_the_options_it_shows():
    named = named_commands()
    assert {("check",), ("train",), ("tokenizer", "extend")} <= set(named)
    assert "--shard-index" in named[("prepare",)] and "--add" in named[("tokenizer", "extend")]
    assert command_problems(named) == []


def test_the_command_check_catches_a_command_or_option_that_does_not_exist(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("Run `strata train RECIPE --run-folder runs/x`, then:\n\n```bash\n"
                    "strata export runs/x --out hf   # not a command\nstrata tokenizer extend B.model --add 5\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "PAGES", [page])
    assert command_problems(named_commands()) == ["`strata export`: no such command",
                                                  "`strata train`: no option --run-folder"]
