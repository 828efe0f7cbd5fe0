"""The READMEs and docs/ run as written: every `aqa …` command in them parses, and the cheap ones run.

Commands are taken from the ```bash blocks (whole command lines, with backslash continuations, shell
variables set in the same block, environment prefixes and `&&` chains) and from inline code spans that
start with `aqa`. A command in a block must parse completely with the real Typer app (subcommand, every
option, option values of the right type, no unexpected arguments). An inline span is a synopsis
(`aqa weights import FILE --name NAME [--format F]`): its subcommand and every `--option` it names must
exist. The cheap commands (help, info, weights list and verify, the demo score) are run as written.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from dataclasses import dataclass

import pytest
import typer

try:  # typer 0.29 carries its own click; the commands it builds raise that click's exceptions
    from typer._click.exceptions import ClickException
except ImportError:  # older typer runs on click itself
    from click.exceptions import ClickException

from aqa_cli.cli import app
from conftest import REPO, invoke_aqa

READMES = [REPO / "README.md", REPO / "weights" / "README.md", REPO / "samples" / "README.md",
           REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# How a README invokes the CLI: `aqa`, the virtual environment's `.venv/bin/aqa`, or `python -m aqa_cli`.
_AQA = re.compile(r"^(?:\S*/)?aqa$")
_SEPARATORS = {"&&", "||", ";", "|"}
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class Command:
    where: str  # README and line, for the failure message
    args: tuple[str, ...]  # after `aqa`
    synopsis: bool  # an inline span: placeholders allowed, only names are checked


def _bash_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, logical lines) of each ```bash block, continuations joined."""
    blocks, current, start = [], None, 0
    for n, line in enumerate(text.splitlines(), start=1):
        if current is None and line.strip().startswith("```bash"):
            current, start = [], n + 1
        elif current is not None and line.strip().startswith("```"):
            blocks.append((start, current))
            current = None
        elif current is not None:
            if current and current[-1].endswith("\\"):
                current[-1] = current[-1][:-1] + " " + line.strip()
            else:
                current.append(line)
    return blocks


def _expand(line: str, variables: dict[str, str]) -> str:
    # A variable set earlier in the block is expanded (word-split as bash does for an unquoted $F);
    # one the prose asks the reader to set (`RUN=` any folder) stands for a path named after it.
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: variables.get(m[1], m[1].lower()), line)


def _aqa_calls(tokens: list[str]) -> list[tuple[str, ...]]:
    """The argument lists of every aqa invocation in a tokenised shell line."""
    calls, segment = [], []
    for tok in [*tokens, ";"]:
        if tok in _SEPARATORS:
            while segment and _ASSIGNMENT.match(segment[0]):
                segment.pop(0)  # OMP_NUM_THREADS=1 aqa …
            if segment and _AQA.match(segment[0]):
                calls.append(tuple(segment[1:]))
            elif segment[:3] and segment[0].endswith("python") and segment[1:3] == ["-m", "aqa_cli"]:
                calls.append(tuple(segment[3:]))
            segment = []
        else:
            segment.append(tok)
    return calls


def readme_commands() -> list[Command]:
    commands = []
    for readme in READMES:
        text = readme.read_text(encoding="utf-8")
        name = readme.relative_to(REPO)
        for start, lines in _bash_blocks(text):
            variables: dict[str, str] = {}
            for offset, line in enumerate(lines):
                tokens = shlex.split(_expand(line, variables), comments=True)
                if len(tokens) == 1 and _ASSIGNMENT.match(tokens[0]):
                    key, _, value = tokens[0].partition("=")
                    variables[key] = value
                    continue
                for args in _aqa_calls(tokens):
                    commands.append(Command(f"{name}:{start + offset}", args, synopsis=False))
        for n, line in enumerate(text.splitlines(), start=1):
            for span in re.findall(r"`([^`]+)`", line):
                if re.match(r"^(?:[A-Z_]+=\S+ )*(?:\S*/)?aqa( |$)", span):
                    tokens = span.replace("…", "").split()
                    for args in _aqa_calls(tokens):
                        commands.append(Command(f"{name}:{n}", args, synopsis=True))
    return commands


COMMANDS = readme_commands()
CLI = typer.main.get_command(app)


def _resolve(args: tuple[str, ...]):
    """(the command, its arguments, the subcommand path) for an argument list."""
    cmd, rest, path = CLI, list(args), []
    while hasattr(cmd, "commands") and rest and not rest[0].startswith("-"):  # a group: descend
        sub = cmd.commands.get(rest[0])
        if sub is None:
            raise AssertionError(f"`aqa {' '.join(path + [rest[0]])}`: no such command "
                                 f"(commands: {', '.join(sorted(cmd.commands))})")
        path.append(rest.pop(0))
        cmd = sub
    return cmd, rest, path


def _options(cmd) -> set[str]:
    names = {"--help"}
    for p in cmd.params:
        names.update(p.opts)
        names.update(p.secondary_opts)
    return names


def test_the_readmes_hold_the_commands_this_test_checks():
    # If the extraction broke, every check below would pass vacuously.
    subcommands = {c.args[0] for c in COMMANDS if c.args and not c.args[0].startswith("-")}
    assert {"score", "extract-features", "train", "evaluate", "weights", "info", "convert-labels"} <= subcommands
    assert sum(not c.synopsis for c in COMMANDS) >= 15
    assert any(c.args == ("score", "samples/routine_fall.mp4", "--preset", "demo") for c in COMMANDS)
    assert any(c.args[:1] == ("evaluate",) and not c.synopsis for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.where} aqa {' '.join(c.args)}"[:90])
def test_every_readme_command_parses(command: Command):
    if command.synopsis and command.args and command.args[0].isupper():
        return  # `aqa COMMAND --help`: a placeholder for every command
    cmd, rest, path = _resolve(command.args)
    shown = f"{command.where}: `aqa {' '.join(command.args)}`"
    if command.synopsis:
        known = _options(cmd)
        for tok in rest:
            opt = tok.strip("[]").split("=")[0]
            if opt.startswith("--"):
                assert opt in known, f"{shown}: `aqa {' '.join(path)}` has no option {opt}"
        return
    if "--help" in rest:
        return
    try:
        cmd.make_context(" ".join(["aqa", *path]), list(rest))
    except ClickException as exc:
        raise AssertionError(f"{shown} does not parse: {exc.format_message()}") from None


# The commands cheap enough to run in the suite, by their argument lists; each must appear in a README.
CHEAP = [("--help",), ("--version",), ("info",), ("weights", "list")]


@pytest.mark.parametrize("args", CHEAP, ids=" ".join)
def test_cheap_readme_commands_run_as_written(args):
    found = [c for c in COMMANDS if c.args == args or c.args[:len(args)] == args and set(c.args[len(args):]) <= {"--help"}]
    if not any(c.args == args for c in found):
        pytest.skip(f"`aqa {' '.join(args)}` is not in the READMEs any more")
    res = invoke_aqa(*args)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr


def test_readme_demo_score_runs_as_written(i3d):
    demo = ("score", "samples/routine_fall.mp4", "--preset", "demo")
    assert any(c.args == demo for c in COMMANDS)
    res = invoke_aqa(*demo)
    assert res.returncode == 0, res.stderr
    assert "Total:" in res.stdout and "/ 10" in res.stdout
    assert "demonstration" in res.stdout.lower()


# ------------------------------------------------------------------------------------------ the newcomer's README

def test_the_readme_fits_a_newcomer_and_docs_hold_the_rest():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    assert "source .venv/bin/activate" in readme
    pages = sorted((REPO / "docs").glob("*.md"))
    assert {"scoring.md", "backbones.md", "training.md", "explanations.md", "determinism-and-security.md",
            "development.md"} <= {p.name for p in pages}
    # Every doc page is reachable from the README.
    assert all(f"docs/{p.name}" in readme for p in pages), [p.name for p in pages if f"docs/{p.name}" not in readme]


def _links() -> list[tuple[str, Path]]:
    found = []
    for page in READMES:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if not re.match(r"^[a-z]+:", target):  # a relative link, not https: or mailto:
                    found.append((f"{page.relative_to(REPO)}:{n}", (page.parent / target.split("#")[0]).resolve()))
    return found


@pytest.mark.parametrize("where,target", _links(), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_every_relative_link_and_picture_exists(where, target):
    shown = target.relative_to(REPO).as_posix() if target.is_relative_to(REPO) else str(target)
    assert target.exists(), f"{where}: {shown} does not exist"
    if target.suffix == ".png":
        assert target.stat().st_size < 200_000, f"{shown} is {target.stat().st_size:,} bytes: keep pictures small"


@pytest.mark.parametrize("command", ["score", "train"])
def test_help_names_every_head(command):
    from aqa_cli.heads import list_heads

    res = invoke_aqa(command, "--help", env={"COLUMNS": "200"})
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    assert all(name in text for name in list_heads()), [n for n in list_heads() if n not in text]


def test_default_preset_without_its_backbone_weights_names_the_preset_and_suggests_the_demo(tmp_path):
    res = invoke_aqa("score", "samples/routine_fall.mp4",
                     env={"AQA_HOME": str(tmp_path), "AQA_OFFLINE": "1", "COLUMNS": "80"})
    assert res.returncode == 2
    error = "".join(res.stderr.split())  # however the terminal wrapped it
    assert "presetfisv(" in error and "backbonevst" in error and "--presetdemo" in error
    from aqa_cli.backbones import get_backbone_spec
    from aqa_cli.weights import get_spec

    url = get_spec(get_backbone_spec("vst").weights).url
    assert error.count(url) == 1  # the address to download by hand, once
    assert "Traceback" not in res.stderr

