"""The README and docs/ cannot rot: every command they show names a script that exists and flags its --help
lists, every method or preset they name is registered, and every relative link and image resolves."""
from __future__ import annotations

import contextlib
import functools
import io
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

import compare
from continual import comparison

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
# Pages of studies that ran the code of 2026-11-29 to 12-01 say so in their header; their commands may use the
# flags of then, which docs/retention.md translates to today's options.
HISTORICAL_MARKER = "before the methods became plugins"
HISTORICAL_FLAGS = {"--retention", "--kl_temperature"}
STAGE_SCRIPTS = ("train_task1.py", "train_teracon.py")     # what run_all.sh and compare.py's `--` pass flags to
WRAPPERS = {"tools/gpu_check.sh": "tools/gpu_check.py"}     # a shell wrapper → the script whose flags it takes
FENCE = re.compile(r"^```(\w*)\s*$")
INLINE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
LAUNCHERS = ("python", "python3", "bash", "torchrun", "$")


def fenced_and_prose(text: str) -> tuple[list[str], str]:
    """(the lines of ```bash/sh/console blocks and indented `$ ` lines, the prose outside every fenced block)."""
    commands, prose, language = [], [], None
    for line in text.split("\n"):
        fence = FENCE.match(line.strip())
        if fence:
            language = fence.group(1) if language is None else None
            continue
        if language is None:
            prose.append(line)
            if line.startswith("    $ "):
                commands.append(line.strip())
        elif language in ("bash", "sh", "console", "shell"):
            commands.append(line)
    return commands, "\n".join(prose)


def joined(lines: list[str]) -> list[str]:
    """Shell lines with backslash continuations joined, comments dropped, split at ; && | and do/then."""
    out, current = [], ""
    for line in lines:
        line = re.sub(r"(^|\s)#.*$", "", line)
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        out.append(current + line)
        current = ""
    pieces = []
    for line in out:
        pieces += [piece.strip() for piece in re.split(r";|&&|\|\||\|", line)]
    return [re.sub(r"^(do|then|else)\s+", "", piece) for piece in pieces if piece]


def page_commands(path: Path) -> list[str]:
    """Every shell command of a page: its code blocks' lines and its inline code spans that launch a script."""
    text = path.read_text(encoding="utf-8")
    lines, prose = fenced_and_prose(text)
    spans = [span for span in INLINE.findall(prose.replace("\n", " ")) if span.split(" ")[0] in LAUNCHERS]
    return [command for command in joined(lines) + spans if command.split(" ")[0] in LAUNCHERS]


def script_of(tokens: list[str]) -> tuple[str | None, list[str]]:
    """(the script a command runs, its arguments), or (None, []) for pytest and other modules."""
    if tokens and tokens[0] == "$":
        tokens = tokens[1:]
    if not tokens or tokens[0] not in ("python", "python3", "bash", "torchrun"):
        return None, []
    for position, token in enumerate(tokens[1:], 1):
        if token == "-m":
            return None, []
        if token.endswith((".py", ".sh")) or token == ".ci/run":
            script = re.sub(r"_t(K|\$k|\$\{k\}|N)\.py$", "_t2.py", token)
            return script, tokens[position + 1:]
    return None, []


def flag_names(arguments: list[str]) -> tuple[set[str], set[str]]:
    """(the script's own flags, the flags after a bare `--`, which go to every stage)."""
    own, passed, target = set(), set(), None
    target = own
    for token in arguments:
        if token == "--":
            target = passed
        elif re.fullmatch(r"--[A-Za-z][\w-]*(=.*)?", token):
            target.add(token.split("=", 1)[0])
    return own, passed


@functools.lru_cache(maxsize=None)
def help_flags(script: str, method: str | None = None) -> frozenset[str]:
    """The flags `python SCRIPT [--method METHOD] --help` lists (a stage script lists a method's own flags under
    its --method; run in this process, where the imports are already loaded)."""
    output, saved_argv = io.StringIO(), sys.argv
    sys.argv = [str(ROOT / script), *(["--method", method] if method else []), "--help"]
    try:
        with contextlib.redirect_stdout(output), pytest.raises(SystemExit) as exited:
            runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        sys.argv = saved_argv
    assert exited.value.code in (0, None), f"{script} --help exited with {exited.value.code}"
    return frozenset(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", output.getvalue()))


def stage_flags(method: str | None = None) -> frozenset[str]:
    return frozenset().union(*(help_flags(script, method) for script in STAGE_SCRIPTS))


def method_of(arguments: list[str]) -> str | None:
    """The registered --method a command names (its flags are listed only under it)."""
    for flag, value in zip(arguments, arguments[1:]):
        if flag == "--method" and value in compare.METHODS:
            return value
    return None


def named_methods(arguments: list[str]) -> list[str]:
    """The values of --method, --preset and --methods (each of the comma list) in a command."""
    names = []
    for flag, value in zip(arguments, arguments[1:]):
        if flag in ("--method", "--preset") and not value.startswith(("$", "<")) and value != "NAME":
            names.append(value)
        if flag == "--methods" and not value.startswith(("$", "<")):
            names += [name for name in value.split(",") if name and name not in ("METHODS", "RULES", "NAME")]
    return names


def test_the_docs_show_commands():
    """The parser finds the commands (so the checks below check something): the two set-up commands first."""
    commands = page_commands(ROOT / "README.md")
    assert "bash run_all.sh demo" in commands and "python -m pytest -q tests" in commands
    assert sum(len(page_commands(page)) for page in PAGES) > 100


def defined_on_page(text: str) -> tuple[set[str], set[str]]:
    """(method names, flags) that a page's own ```python blocks define: a worked example's `name = "..."` and its
    options (`NAME: type = flags.option(...)`, the flag --NAME), which the page's commands then use."""
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    code = "\n".join(blocks)
    options = {f"--{name}" for name in re.findall(r"^\s+(\w+): [^=]+= flags\.option\(", code, flags=re.M)}
    return set(re.findall(r'^\s+name = "(\w+)"', code, flags=re.M)), options


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_command_names_a_script_and_its_flags(page):
    text = page.read_text(encoding="utf-8")
    historical = HISTORICAL_MARKER in text
    own_methods, own_flags = defined_on_page(text)
    problems = []
    for command in page_commands(page):
        try:
            tokens = shlex.split(command)
        except ValueError:
            tokens = command.split()
        script, arguments = script_of(tokens)
        if script is None:
            continue
        if not (ROOT / script).is_file():
            problems.append(f"{command}: {script} does not exist")
            continue
        method = method_of(arguments)
        if not script.endswith(".py") and script not in WRAPPERS:
            accepted = stage_flags(method) if script == "run_all.sh" else frozenset()
        elif script.startswith("train_") and tokens[0] == "$":   # a transcript of refused input: any method's flag
            accepted = frozenset().union(*(help_flags(script, name) for name in compare.METHODS))
        elif script.startswith("train_"):
            accepted = help_flags(script, method)
        else:
            accepted = help_flags(WRAPPERS.get(script, script))
        own, passed = flag_names(arguments)
        allowed_then = (HISTORICAL_FLAGS if historical else set()) | own_flags
        unknown = sorted(flag for flag in own if flag not in accepted and flag not in allowed_then)
        unknown += sorted(flag for flag in passed if flag not in stage_flags(method) and flag not in allowed_then)
        if unknown and not (script == ".ci/run"):
            problems.append(f"{command}: {', '.join(unknown)} not in {script} --help")
        names = [] if historical and "--methods" in arguments else named_methods(arguments)
        problems += [f"{command}: method or preset {name!r} is not registered" for name in names
                     if not comparison.known_name(name) and name not in own_methods]
    assert not problems, "\n".join(problems)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    found = set()
    for line in path.read_text(encoding="utf-8").split("\n"):
        heading = re.match(r"^#+\s+(.*)", line)
        if heading:
            found.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(page):
    _, prose = fenced_and_prose(page.read_text(encoding="utf-8"))
    problems = []
    for target in LINK.findall(prose):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        file, _, fragment = target.partition("#")
        destination = (page.parent / file).resolve() if file else page
        if not destination.exists():
            problems.append(f"{target}: no such file")
        elif fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            problems.append(f"{target}: no heading #{fragment} in {destination.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)


def test_a_broken_command_or_link_is_caught(tmp_path):
    """The checks fail on what they are for: a missing script, an unknown flag, an unregistered method, a dead link."""
    page = tmp_path / "page.md"
    page.write_text("```bash\npython nowhere.py --x 1\npython compare.py --dataset synth --no_such_flag\n"
                    "python compare.py --dataset synth --methods teracon,not_a_method\n```\n[dead](missing.md)\n")
    commands = page_commands(page)
    assert len(commands) == 3
    assert not (ROOT / script_of(shlex.split(commands[0]))[0]).is_file()
    own, _ = flag_names(script_of(shlex.split(commands[1]))[1])
    assert "--no_such_flag" in own and "--no_such_flag" not in help_flags("compare.py")
    assert [name for name in named_methods(shlex.split(commands[2])) if not comparison.known_name(name)] == ["not_a_method"]
    _, prose = fenced_and_prose(page.read_text())
    assert LINK.findall(prose) == ["missing.md"] and not (tmp_path / "missing.md").exists()


# ------------------------------------------------------------------ prose: flags, method lists, dates

SCRIPTS_WITH_FLAGS = ("train_task1.py", "train_teracon.py", "compare.py", "evaluate.py", "predict.py",
                      "prepare_data.py", "tools/synth.py", "tools/ttl_shaped.py", "tools/paper_table.py",
                      "tools/figures.py", "tools/bench.py", "tools/scale_report.py", "tools/gpu_check.py",
                      "tools/replay_check.py")
DATING = re.compile(r"\b(this|that) (evening|morning|afternoon|night|session)\b|\b(yesterday|tonight)\b", re.I)


@functools.lru_cache(maxsize=None)
def every_flag() -> frozenset[str]:
    """The flags any script lists, with every method's own."""
    found = frozenset().union(*(help_flags(script) for script in SCRIPTS_WITH_FLAGS))
    return found.union(*(help_flags(script, method) for script in STAGE_SCRIPTS for method in compare.METHODS))


def retired_flags() -> set[str]:
    """Flags that existed once: the studies' of 2026-11-29 to 12-01 and the methods' retired options."""
    from continual.methods import method_class
    return HISTORICAL_FLAGS | {"--no_retention"} | {flag for method in compare.METHODS
                                                    for flag in method_class(method).retired}


def prose_problems(text: str, record: bool = False) -> list[str]:
    """What a page's prose gets wrong: an inline `--flag ...` that no script has (a retired one only on a page that
    records the past: a study, or `record`), a `--method a|b|...` list that is not every registered method, and a
    phrase that dates the page by when it was written ("that evening", "this session") where a date belongs."""
    _, prose = fenced_and_prose(text)
    allowed = every_flag() | defined_on_page(text)[1] | (retired_flags() if record or HISTORICAL_MARKER in text
                                                         else set())
    problems = []
    for span in INLINE.findall(prose.replace("\n", " ")):
        if not span.startswith("--"):                 # a command: test_every_command_names_a_script_and_its_flags
            continue
        for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", span):
            if flag not in allowed:
                problems.append(f"`{span}`: {flag} is no script's flag")
        listed = re.fullmatch(r"--method ([\w\\|]+)", span)
        if listed and "|" in listed.group(1):
            names = set(listed.group(1).replace("\\", "").split("|"))
            if names != set(compare.METHODS):
                problems.append(f"`{span}`: lists {len(names)} of the {len(compare.METHODS)} methods")
    problems += [f"{match.group(0)!r}: a date belongs here" for match in DATING.finditer(prose)]
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_prose_names_real_flags_every_method_and_dates(page):
    """A study page (docs/experiments/) and the page that translates the retired flags record the past."""
    record = "experiments" in page.parts or page.name in ("retention.md", "CHANGELOG.md")
    problems = prose_problems(page.read_text(encoding="utf-8"), record)
    assert not problems, "\n".join(problems)


def test_prose_checks_catch_a_removed_flag_a_short_method_list_and_a_relative_date():
    found = prose_problems("Use `--retention paper` or `--method teracon|finetune`; that evening's machine ran slow.")
    assert prose_problems("`--retention paper` of 2026-11-30.", record=True) == []
    assert len(found) == 3 and "--retention" in found[0] and "lists 2 of" in found[1] and "evening" in found[2]


def test_the_readme_is_a_guide_of_at_most_300_lines_with_its_start_here_block_first():
    """The README stays a newcomer's guide: at most 300 lines, a Start-here block of at most 15 lines first with the
    two commands, and no machine model or commit hash (they belong to docs/performance.md, the study pages and
    CHANGELOG.md)."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").split("\n")
    assert len(lines) <= 301                                       # 300 lines and the final newline
    block = [line for line in lines[1:20] if line.startswith(">")]
    assert "Start here" in block[0] and len(block) <= 15
    assert any("bash run_all.sh demo" in line for line in block) and any("pytest" in line for line in block)
    prose = fenced_and_prose("\n".join(lines))[1]
    assert not re.search(r"EPYC|Xeon|AVX|\bfrom a fresh clone of [0-9a-f]{7}", prose)
