"""The docs cannot rot: every ```python block of README.md, ARCHITECTURE.md and docs/*.md runs as written,
standalone, on the CPU, in under a minute, unless its first line is ``# not run: <why>``; and the CLI explains
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


@needs_tree
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_run(page):
    blocks = python_blocks(page)
    skipped = [name for name, code in blocks if code.startswith("# not run:")]
    for name, code in blocks:
        if code.startswith("# not run:"):
            assert len(code.splitlines()[0]) > len("# not run: ") + 5, f"{name}: say why it does not run"
    run = [(n, c) for n, c in blocks if n not in skipped]
    if not run:
        return
    with tempfile.TemporaryDirectory() as tmp:  # outside the tree: the installed package, files land in tmp
        res = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(run), capture_output=True, text=True,
                             cwd=tmp, timeout=60 * len(run) + 60)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    times = dict(line.split()[1:] for line in res.stdout.splitlines() if line.startswith("OK "))
    assert len(times) == len(run)
    slow = {n: t for n, t in times.items() if float(t) > 60}
    assert not slow, f"blocks over a minute: {slow}"


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
