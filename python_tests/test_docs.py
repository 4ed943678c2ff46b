"""The docs cannot rot: every ```python block of README.md, ARCHITECTURE.md and docs/*.md runs as written,
standalone, on the CPU, unless its first line is ``# not run: <why>``; every ``mdk`` command of a ```bash block
parses; every link and path resolves inside the repository; every figure names its source; and the CLI explains
every flag."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [p for p in [REPO / "README.md", REPO / "ARCHITECTURE.md", *sorted((REPO / "docs").glob("*.md"))] if p.exists()]
needs_tree = pytest.mark.skipif(not (REPO / "docs").is_dir(), reason="needs the source tree")

_RUNNER = r"""
import json, sys, time, traceback
blocks = json.loads(sys.stdin.read())
for name, code in blocks:
    t0 = time.perf_counter()
    try:
        exec(compile(code, name, "exec"), {"__name__": "__main__"})  # a fresh namespace: standalone
    except BaseException:
        print(f"FAILED {name}\n{traceback.format_exc()}", flush=True)
        sys.exit(1)
    print(f"OK {name} {time.perf_counter() - t0:.1f}", flush=True)
"""


def python_blocks(page: Path) -> list[tuple[str, str]]:
    text = page.read_text()
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S):
        line = text[: m.start()].count("\n") + 1
        out.append((f"{page.relative_to(REPO)}:{line}", m.group(1)))
    return out


def test_every_page_has_been_found():
    assert len(PAGES) >= 13 or not (REPO / "docs").is_dir()


# the pages with a python block to run (a page without one, or whose blocks all say why not, has nothing to run)
WITH_BLOCKS = [p for p in PAGES if any(not c.startswith("# not run:") for _, c in python_blocks(p))]


def test_the_pages_with_python_blocks():
    assert len(WITH_BLOCKS) >= 5 or not (REPO / "docs").is_dir(), [p.name for p in WITH_BLOCKS]


def test_a_block_that_does_not_run_says_why():
    for page in PAGES:
        for name, code in python_blocks(page):
            if code.startswith("# not run:"):
                assert len(code.splitlines()[0]) > len("# not run: ") + 5, f"{name}: say why it does not run"


@pytest.mark.slow
@needs_tree
@pytest.mark.parametrize("page", WITH_BLOCKS, ids=lambda p: p.name)
def test_python_blocks_run(page):
    blocks = python_blocks(page)
    run = [(n, c) for n, c in blocks if not c.startswith("# not run:")]
    with tempfile.TemporaryDirectory() as tmp:  # outside the tree: the installed package, files land in tmp
        res = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(run), capture_output=True, text=True,
                             cwd=tmp, timeout=60 * len(run) + 60)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ran = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("OK ")]
    assert ran == [n for n, _ in run]


@needs_tree
def test_readme_is_short_and_links_every_doc():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    for page in (REPO / "docs").glob("*.md"):
        assert f"docs/{page.name}" in text, f"the README does not link {page.name}"
    for link in re.findall(r"\]\(((?:docs/|bench/)[^)#]+)", text):
        assert (REPO / link).exists(), f"the README links a missing file: {link}"
    for page in (REPO / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([^)#:]+)", page.read_text()):
            assert (page.parent / link).exists(), f"{page.name} links a missing file: {link}"


def _all_actions(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {a}", h) for a, h in _all_actions(sub))
        elif action.dest != "help":
            yield "/".join(action.option_strings) or action.dest, action.help


def test_every_cli_flag_explains_itself():
    from mdkernels.cli import build_parser

    actions = list(_all_actions(build_parser()))
    missing = [name for name, help_ in actions if not help_ or help_.startswith("default:")]
    assert not missing, f"flags without a help line: {missing}"
    train = [name for name, _ in actions if name.startswith("train --")]
    assert len(train) > 60


def test_train_help_is_grouped():
    import dataclasses

    from mdkernels.train.config import GROUPS, HELP
    from mdkernels.train.trainer import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields == set(HELP), f"TrainConfig fields without help: {fields - set(HELP)}; stale: {set(HELP) - fields}"
    assert {g for g, _ in HELP.values()} == set(GROUPS)
    res = subprocess.run([sys.executable, "-m", "mdkernels.cli", "train", "--help"], capture_output=True, text=True,
                         cwd=tempfile.gettempdir(), timeout=120)  # fmt: skip
    assert res.returncode == 0
    for g in GROUPS:
        assert f"\n{g}:\n" in res.stdout


@needs_tree
def test_the_math_page_holds_every_section_the_code_cites():
    """docs/math.md is the contract in the repository: every "math.md §N" (or §N-M) cited by the code, csrc, the
    tests and the docs names a section it has, and nothing cites a math file outside the repository."""
    page = (REPO / "docs" / "math.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", page, re.M)}
    assert sections == set(range(1, 10)), sorted(sections)
    files = [*REPO.glob("mdkernels/**/*.py"), *REPO.glob("csrc/**/*.[ch]*"), *REPO.glob("python_tests/*.py"),
             *PAGES, REPO / "CHANGELOG.md"]  # fmt: skip
    cited, outside = set(), []
    old_name = "SP" + "EC"  # the contract's name before it moved into the repository
    for path in files:
        text = path.read_text(errors="ignore")
        if re.search(rf"\b{old_name}\b|\.\./shared", text) and path.name != "CHANGELOG.md":
            outside.append(str(path.relative_to(REPO)))
        for a, b in re.findall(r"math\.md\)?'?s? §\s?(\d+)(?:\s?[-–]\s?(\d+))?", text):
            cited |= set(range(int(a), int(b or a) + 1))
    assert not outside, f"cites the old contract or a path outside the repository: {outside}"
    assert len(cited) >= 8 and cited <= sections, f"cited sections the page lacks: {sorted(cited - sections)}"


@needs_tree
def test_the_tested_versions_are_the_passing_rows_of_the_compat_table():
    """``mdkernels._floor.TESTED`` (the import error's "tested: ...") names the torch and Triton versions whose rows
    of bench/results/compat.md (the README's table) passed, lowest to highest."""
    from mdkernels._floor import TESTED

    rows = [r.split("|")[1:-1] for r in (REPO / "bench" / "results" / "compat.md").read_text().splitlines()
            if r.startswith("| t")]  # fmt: skip
    ok = [(cells[0].strip(), cells[1].strip(), cells[2].strip()) for cells in rows if cells[3].strip() == "ok"]
    minor = lambda v: tuple(int(x) for x in v.split("+")[0].split(".")[:2])  # noqa: E731
    torches = sorted({minor(t) for _, t, _ in ok})
    tritons = sorted({minor(tr) for _, _, tr in ok})
    want = (f"torch {'.'.join(map(str, torches[0]))} to {'.'.join(map(str, torches[-1]))} and Triton "
            f"{'.'.join(map(str, tritons[0]))} to {'.'.join(map(str, tritons[-1]))}")  # fmt: skip
    assert TESTED == want


def mdk_commands(page: Path) -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of every ``mdk ...`` (or ``python -m mdkernels.cli ...``) command in the ```bash blocks."""
    import shlex

    text, out = page.read_text(), []
    for m in re.finditer(r"^```(?:bash|sh|console)\n(.*?)^```", text, re.M | re.S):
        line0 = text[: m.start()].count("\n") + 1
        joined = re.sub(r"\\\n\s*", " ", m.group(1))
        for k, line in enumerate(joined.splitlines()):
            code = "" if line.lstrip().startswith("#") else line.split(" #")[0].strip()
            for part in re.split(r"&&|;|\|\|", code):
                words = shlex.split(part.strip().lstrip("$ ")) if part.strip() else []
                while words and ("=" in words[0] and not words[0].startswith("-")):  # VAR=value prefixes
                    words = words[1:]
                if words[:1] == ["mdk"]:
                    out.append((f"{page.relative_to(REPO)}:{line0 + k + 1}", words[1:]))
                elif "mdkernels.cli" in words:
                    out.append((f"{page.relative_to(REPO)}:{line0 + k + 1}", words[words.index("mdkernels.cli") + 1 :]))
    return out


@needs_tree
def test_every_mdk_command_in_the_docs_parses():
    """The ```bash blocks are not run (they need data or a GPU), but every ``mdk`` command in them must parse with
    ``mdk``'s own parser, so that a renamed or removed flag cannot stay in the docs."""
    from mdkernels.cli import build_parser

    commands = [c for page in PAGES for c in mdk_commands(page)]
    assert len(commands) >= 15
    bad = []
    for where, argv in commands:
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            bad.append(f"{where}: mdk {' '.join(argv)}")
    assert not bad, "\n".join(bad)


LINKED_PAGES = [p for p in [REPO / "README.md", REPO / "ARCHITECTURE.md", REPO / "CHANGELOG.md",
                            *sorted((REPO / "docs").glob("*.md"))] if p.exists()]  # fmt: skip


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


@needs_tree
@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: p.name)
def test_every_link_and_path_resolves_inside_the_repository(page):
    """Every relative link (and its #anchor) and every repository path named in backticks resolves to a file of
    this repository; a link that leaves it (``../``) fails, since a user's clone has nothing beside it."""
    text = page.read_text()
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if REPO.resolve() not in dest.parents and dest != REPO.resolve():
            bad.append(f"{target}: leaves the repository")
        elif not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md":
            anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)}
            if anchor not in anchors:
                bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    for path in re.findall(r"`((?:mdkernels|bench|csrc|docs|python_tests|scripts|\.ci)/[\w./-]+)`", text):
        if not (REPO / path.rstrip("/")).exists():
            bad.append(f"`{path}`: no such path")
    assert not bad, f"{page.name}:\n" + "\n".join(bad)


FIGURE = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?\s?(?:ms|MiB|images/s|TFLOP/s|hours?|min)\b"
                    r"|(?<![\w.])\d+(?:\.\d+)?%")  # fmt: skip


def _sections(text: str) -> list[tuple[str, str]]:
    """``(heading, body)`` of each section, code blocks left out (a command's output is no claim of the page)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    parts = re.split(r"(?m)^(#+ .*)$", text)
    return [(parts[i].strip(), parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


@needs_tree
@pytest.mark.parametrize("page", [p for p in LINKED_PAGES if p.name != "CHANGELOG.md"], ids=lambda p: p.name)
def test_every_figure_names_its_source_and_commit(page):
    """A section that states a measured figure (ms, MiB, images/s, TFLOP/s, hours, minutes, a percentage) names the
    file in ``bench/results/`` it comes from and the commit measured, and that file holds that commit."""
    bad = []
    for heading, body in _sections(page.read_text()):
        figures = FIGURE.findall(body)
        if not figures or "No figures" in body:
            continue
        sources = [s.rstrip(".") for s in re.findall(r"bench/results/[\w./-]+", body)]
        data = [s for s in sources if not s.endswith(".png")]
        commits = set(re.findall(r"\bcommits? `?([0-9a-f]{7,40})\b", body)) | set(re.findall(r"\bat ([0-9a-f]{7})\b",
                                                                                               body))  # fmt: skip
        if not data or not commits:
            bad.append(f"{heading}: figures {figures[:3]} without a bench/results file and a commit")
            continue
        held = "\n".join((REPO / s).read_text() for s in data if (REPO / s).is_file())
        missing = [c for c in commits if c not in held]
        if missing:
            bad.append(f"{heading}: commit(s) {missing} not in {data}")
    assert not bad, f"{page.name}:\n" + "\n".join(bad)
