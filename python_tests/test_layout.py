"""The layout the README and ARCHITECTURE.md promise: one op, one name, no import cycle, no cross-op privates.

The import graph is read with ``ast`` from the source files (function-level imports included, so that
a cycle cannot hide inside a function), not by importing anything.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
import torch

import mdkernels
from mdkernels.ops import OPS

PACKAGE = Path(mdkernels.__file__).resolve().parent
# the checkout these tests run from (in CI the package under test is installed elsewhere, in site-packages)
REPO = Path(__file__).resolve().parents[1]
HAS_TREE = (REPO / "bench").is_dir() and (REPO / "csrc").is_dir()
needs_tree = pytest.mark.skipif(not HAS_TREE, reason="needs the source tree (bench/, csrc/)")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
# the compiled modules CMakeLists.txt builds
EXTENSIONS = {"mdkernels._cpu", "mdkernels._cuda", "mdkernels._cuda_emu", "mdkernels._cuda_emu_asan"}


def imports_of(path: Path, with_alias: bool = False) -> list[tuple]:
    """(module, imported name or None, line[, bound name]) of every mdkernels import in ``path``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno, a.asname or a.name) for a in node.names
                      if a.name.split(".")[0] == "mdkernels"]  # fmt: skip
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mdkernels":
            found += [(node.module, a.name, node.lineno, a.asname or a.name) for a in node.names]
    return found if with_alias else [f[:3] for f in found]


def target(module: str, name: str | None) -> str:
    """The module an import loads: ``from a.b import c`` loads a.b.c when that is a module, else a.b."""
    if name is not None and (f"{module}.{name}" in MODULES or f"{module}.{name}" in EXTENSIONS):
        return f"{module}.{name}"
    return module


def graph() -> dict[str, set[str]]:
    return {m: {target(mod, name) for mod, name, _ in imports_of(p)} - {m} for m, p in MODULES.items()}


def test_no_import_cycle_inside_mdkernels():
    g = graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n in g and n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


# The product around the kernels, one package per concern, and what each may reach (imports, transitively):
# the kernels ("core": ops, nn, functional, distributed, reference, ...) reach none of them; evaluation never
# reaches the training loop; nothing imports the CLI, the one place besides the training loop that knows them all.
PARTS = ("models", "data", "interop", "eval", "train", "progress", "cli")
MAY_REACH = {
    "core": set(),
    "progress": set(),
    "models": set(),
    "data": set(),
    "interop": {"models", "data"},
    "eval": {"models", "data", "interop", "progress"},
    "train": {"models", "data", "interop", "eval", "progress"},
    "cli": {"models", "data", "interop", "eval", "train", "progress"},
}


def part(module: str) -> str:
    name = module.split(".")[1] if module.count(".") else ""
    return name if name in PARTS else "core"


def reach(g: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for n in g.get(todo.pop(), ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def test_each_part_of_the_product_reaches_only_what_it_may():
    g = graph()
    assert {part(m) for m in MODULES} >= set(PARTS), "a package of the product is missing"
    bad = []
    for m in sorted(MODULES):
        mine = part(m)
        for n in sorted(reach(g, m)):
            theirs = part(n)
            if theirs not in (mine, "core") and theirs not in MAY_REACH[mine]:
                bad.append(f"{m} ({mine}) reaches {n} ({theirs})")
            if mine != "cli" and theirs == "cli" and m != "mdkernels.cli":
                bad.append(f"{m} imports the CLI")
    assert not bad, "\n".join(bad[:30])


def test_each_package_says_its_purpose_in_one_line():
    for name in ("models", "data", "interop", "eval", "train", "reference", "nn", "ops", "tools"):
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and len(doc.split("\n\n")[0]) <= 240, f"mdkernels/{name}/__init__.py needs a short purpose line"


def owner(module: str) -> str:
    """The unit that may share underscore names: an op's package, or else the module's own package."""
    parts = module.split(".")
    if parts[:2] == ["mdkernels", "ops"] and len(parts) > 2:
        return ".".join(parts[:3])
    return module if MODULES.get(module, Path()).name == "__init__.py" else ".".join(parts[:-1])


def test_no_module_imports_another_units_private_names():
    bad = []
    for m, path in MODULES.items():
        aliases = {}
        for mod, name, line, bound in imports_of(path, with_alias=True):
            loaded = target(mod, name)
            if name is None or loaded != mod:  # a module: remember its alias for attribute access below
                aliases[bound] = loaded
            elif name.startswith("_") and owner(mod) != owner(m):
                bad.append(f"{path.name}:{line} imports {mod}.{name}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                src = aliases[node.value.id]
                private = node.attr.startswith("_") and not node.attr.startswith("__")
                if private and f"{src}.{node.attr}" not in MODULES and owner(src) != owner(m):
                    bad.append(f"{path.name}:{node.lineno} reads {src}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_the_reference_imports_nothing_of_the_fused_paths():
    """mdkernels/reference/ (the package) imports only _validate, _math and its own modules."""
    mine = {m for m in MODULES if m == "mdkernels.reference" or m.startswith("mdkernels.reference.")}
    allowed = {"mdkernels._validate", "mdkernels._math", *mine}
    used = {target(mod, name) for m in mine for mod, name, _ in imports_of(MODULES[m])}
    assert len(mine) >= 3 and used <= allowed, f"mdkernels/reference/ imports {sorted(used - allowed)}"


def test_no_file_is_above_500_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}  # fmt: skip
    assert not long, f"split these files (one concern each): {long}"


def test_every_math_constant_is_defined_once():
    pattern = re.compile(r"^(EPS|THETA_CLAMP|NEG_BIG)\s*=|^def compute_dtype\(", re.M)
    where = [
        f"{p.relative_to(PACKAGE.parent)}: {m.group(0)}" for p in PACKAGE.rglob("*.py")
        for m in pattern.finditer(p.read_text())
    ]
    names = [w.split(": ")[1].split("=")[0].strip() for w in where]
    assert len(names) == len(set(names)), "\n".join(where)


@pytest.mark.parametrize("name", list(OPS))
def test_each_registered_op_has_every_piece(name):
    op = OPS[name]
    for fn in op.functions:
        assert callable(getattr(mdkernels.functional, fn, None)), f"mdkernels.functional.{fn}"
        assert fn in mdkernels.__all__, f"{fn} is not exported by mdkernels"
    if op.built_on is not None:
        assert op.package is None and op.built_on in OPS and set(op.backends) <= set(OPS[op.built_on].backends)
    else:
        module = importlib.import_module(op.package)
        if MODULES[op.package].name == "__init__.py":  # an op package: one module per backend
            assert f"{op.package}.op" in MODULES, f"{op.package} has no op.py"
            for backend in op.backends:
                assert f"{op.package}.{backend}_backend" in MODULES, f"{op.package} has no {backend}_backend.py"
        assert module is not None
    for custom in op.custom_ops:
        assert hasattr(torch.ops.mdkernels, custom), f"mdkernels::{custom} is not registered"
        assert custom.startswith(name) or name == "l2norm", f"mdkernels::{custom} does not carry the op's name"
    if HAS_TREE:
        assert (REPO / "python_tests" / f"test_{name}.py").is_file(), f"python_tests/test_{name}.py"
        for src in op.csrc:
            assert (REPO / src).is_file(), src
        assert ("cuda" in op.backends) == bool(op.csrc) or op.built_on is not None


@needs_tree
def test_bench_keys_csv_rows_and_dispatch_rows_use_the_op_names(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    keys = []
    for path in sorted((REPO / "bench").glob("bench_*.py")):
        keys += importlib.import_module(f"bench.{path.stem}").OPS
    assert sorted(keys) == sorted(OPS), "every op has exactly one bench key, its own name"
    import csv

    for path in (REPO / "bench" / "results").glob("*.csv"):
        with path.open() as f:
            ops = {row["op"] for row in csv.DictReader(f)}
        assert ops <= set(OPS), f"{path.name}: rows of unknown ops {sorted(ops - set(OPS))}"
    from mdkernels.dispatch_table import ROWS

    assert {r["op"] for r in ROWS} <= set(OPS)


@needs_tree
def test_architecture_and_readme_name_files_that_exist():
    text = (REPO / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:mdkernels|csrc)/[\w/]+\.(?:py|cu|h|cpp))`", text))
    assert len(named) >= 8, "ARCHITECTURE.md names the file at each step"
    missing = sorted(n for n in named if not (REPO / n).is_file())
    assert not missing, f"ARCHITECTURE.md names missing files: {missing}"
    layout = text[text.index("## Layout") :] if "## Layout" in text else ""
    for name, op in OPS.items():
        if op.package and MODULES[op.package].name == "__init__.py":
            assert f"{name}/" in layout, f"ARCHITECTURE.md's layout section lacks ops/{name}/"


# ---- one road from a module to its kernel ----------------------------------------------------------------------
def road(fn) -> list[str]:
    """The files a module's call goes through to its kernel: the planning walk (every mdkernels file entered, in
    order, from the call into :mod:`mdkernels.functional` until an op's ``op.py`` is entered; repeats in a row
    merged: a return to a caller is not a step, but a caller calling again after a callee elsewhere is), then the
    callers of the kernel's launcher when it is entered (the op, its backend module), outermost first. Paths are
    relative to the package. The module's own work before its call (a head's norms and buffers) is not on it."""
    import sys

    walk, chain = [], []

    def rel(frame) -> str | None:
        f = frame.f_code.co_filename
        return str(Path(f).resolve().relative_to(PACKAGE)) if f.startswith(str(PACKAGE)) else None

    def prof(frame, event, arg):
        if event != "call" or chain:
            return
        name = rel(frame)
        if name is None or (not walk and name != "functional.py"):
            return
        planning = not any(n.endswith("/op.py") for n in walk)
        if planning and walk[-1:] != [name]:
            walk.append(name)
        if name.endswith("_backend.py"):
            f, stack = frame, []
            while f is not None:
                r = rel(f)
                if r is not None and r not in stack:
                    stack.append(r)
                f = f.f_back
            chain.extend(n for n in reversed(stack) if n not in walk and not n.startswith("nn/"))

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return walk + chain


def climbs(files: list[str]) -> list[tuple[str, str]]:
    """Steps of ``files`` that go back up the import order: the next file imports the previous one."""
    g = graph()
    mod = {str(p.relative_to(PACKAGE)): m for m, p in MODULES.items()}
    return [(a, b) for a, b in zip(files, files[1:], strict=False) if mod[a] in reach(g, mod[b])]


ROAD_HEADS = {
    "ArcFace": lambda b: mdkernels.nn.ArcFace(64, 100, backend=b),
    "CombinedMargin": lambda b: mdkernels.nn.CombinedMargin(64, 100, m1=1.0, m2=0.3, m3=0.2, backend=b),
    "AdaFace": lambda b: mdkernels.nn.AdaFace(64, 100, backend=b),
    "MagFace": lambda b: mdkernels.nn.MagFace(64, 100, backend=b),
    "PartialFCHead": lambda b: mdkernels.nn.PartialFCHead(64, 100, backend=b),
}


def _road_backends() -> list[str]:
    from mdkernels import _cuda_ext

    out = ["torch"]
    if mdkernels.ops._common.env.HAS_TRITON and mdkernels.backends.INTERPRETER:
        out.append("triton")
    if _cuda_ext.emu is not None:
        out.append("cuda")
    return out


@pytest.mark.parametrize("backend", _road_backends())
@pytest.mark.parametrize("name", list(ROAD_HEADS))
def test_one_road_from_a_module_to_its_kernel(name, backend):
    """The plan is made once (mdkernels/_plan.py) and handed down: the road from a head to its kernel visits no
    file twice and climbs back up the import order at most twice (ARCHITECTURE.md walks it)."""
    import contextlib

    from mdkernels import _cuda_ext

    head = ROAD_HEADS[name](backend)
    x, y = torch.randn(8, 64, requires_grad=True), torch.randint(0, 100, (8,))
    with _cuda_ext.emulated() if backend == "cuda" else contextlib.nullcontext():
        head(x, y)  # imports and caches out of the way
        files = road(lambda: head(x, y))
    assert files[0] == "functional.py" and files[-1] == f"ops/margin_ce/{backend}_backend.py", files
    assert "_plan.py" in files and "backends.py" in files, files
    assert len(files) == len(set(files)), f"a file visited twice: {' -> '.join(files)}"
    assert len(climbs(files)) <= 2, f"climbs {climbs(files)} in {' -> '.join(files)}"


def test_the_ops_execute_a_plan_and_decide_nothing():
    """No module of mdkernels/ops/ imports the backend rules or the plan: the backend reaches an op decided."""
    g = graph()
    bad = [m for m in MODULES if m.startswith("mdkernels.ops") and {"mdkernels.backends", "mdkernels._plan"} & g[m]]
    assert not bad, f"ops that decide again: {bad}"
