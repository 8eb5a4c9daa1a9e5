"""The import graph of the four packages, read from the source (ast), not from what a test run
happened to import: no cycles, and every edge along DESIGN §0's direction.

Every import counts — module level and inside functions (a lazy import still runs, and a cycle
through one only waits for the first call) — except those under ``if TYPE_CHECKING:``, which never
run. An edge goes to the module named (``from a.b import c`` is ``a.b.c`` when ``c`` is a module,
else ``a.b``, the package's ``__init__`` when ``a.b`` is a package).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pfedpg", "attacks", "defenses", "evaluations")

#: DESIGN §0: what each package may import (besides itself)
ALLOWED = {
    "pfedpg": set(),
    "attacks": {"pfedpg"},
    "defenses": {"pfedpg"},
    "evaluations": {"pfedpg", "attacks", "defenses"},
}


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(tree: ast.AST, module: str, is_package: bool, type_checking: bool = False) -> set[str]:
    """Dotted names this module imports at run time (absolute; relative ones resolved)."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test) and not type_checking:
                for c in child.orelse:
                    visit_one(c)
                continue
            visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.update(f"{prefix}.{a.name}" for a in node.names)
        visit(node)

    visit(tree)
    return names


def import_graph(root: Path = ROOT, type_checking: bool = False) -> dict[str, set[str]]:
    mods = modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = set()
        for imp in imported_names(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py",
                                  type_checking):
            # the longest known module that the name starts with (a.b.c.func -> a.b.c)
            parts = imp.split(".")
            for k in range(len(parts), 0, -1):
                cand = ".".join(parts[:k])
                if cand in mods:
                    if cand != name:
                        targets.add(cand)
                    break
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def against_direction(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in sorted(graph.items()):
        top = src.split(".")[0]
        for t in sorted(targets):
            other = t.split(".")[0]
            if other != top and other not in ALLOWED[top]:
                bad.append(f"{src} -> {t}")
    return bad


def test_the_import_graph_has_no_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (break each by moving the shared part down a floor): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_every_import_follows_design_section_0():
    bad = against_direction(import_graph())
    assert not bad, "imports against DESIGN §0 (pfedpg imports no plug-in; attacks and defenses never each " \
                    "other): " + "; ".join(bad)


def test_the_checker_sees_lazy_imports_and_skips_type_checking(tmp_path):
    """The checker itself: a cycle through a function-level import and an edge against the direction
    are found; the same edges under ``if TYPE_CHECKING:`` are not."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "pfedpg" / "a.py").write_text("from pfedpg import b\n")
    (tmp_path / "pfedpg" / "b.py").write_text("def f():\n    from pfedpg.a import thing\n")
    (tmp_path / "pfedpg" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                               "    from pfedpg.d import x\n    import defenses.robust\n")
    (tmp_path / "pfedpg" / "d.py").write_text("from .c import y\n")
    (tmp_path / "attacks" / "m.py").write_text("def g():\n    import defenses.robust\n")
    (tmp_path / "defenses" / "robust.py").write_text("from pfedpg.a import thing\n")
    g = import_graph(tmp_path)
    assert cycles(g) == [["pfedpg.a", "pfedpg.b"]]
    assert against_direction(g) == ["attacks.m -> defenses.robust"]
    assert g["pfedpg.d"] == {"pfedpg.c"} and g["pfedpg.c"] == set()


def test_no_cycle_even_through_type_checking_imports():
    """Annotations are dependencies too: a cycle that only ``if TYPE_CHECKING:`` keeps apart at run
    time still ties the modules together (pfedpg.data.config -> embedded -> partition -> config
    did, until the styles moved to pfedpg.data.styles)."""
    found = cycles(import_graph(type_checking=True))
    assert not found, "; ".join(" <-> ".join(c) for c in found)


def test_no_module_imports_the_deprecated_faces():
    """Internal code imports pfedpg.run and pfedpg.jobs directly (issue 30): nothing imports the old
    pfedpg.runner face, and nothing takes the job types through pfedpg.hooks."""
    graph = import_graph()
    assert not [m for m, deps in graph.items() if "pfedpg.runner" in deps and m != "pfedpg.runner"]
    moved = {"ClientData", "LocalJob", "LocalResult"}
    offenders = []
    for path in [*modules().values(), *sorted((ROOT / "bench").glob("*.py")), *sorted((ROOT / "tests").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in ("pfedpg.runner", "pfedpg.hooks") and \
                    (node.module == "pfedpg.runner" or moved & {a.name for a in node.names}):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_the_deprecated_faces_still_work_with_a_warning():
    import importlib
    import sys
    import warnings

    import pfedpg.hooks
    import pfedpg.jobs
    import pfedpg.run

    sys.modules.pop("pfedpg.runner", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = importlib.import_module("pfedpg.runner")
        job = pfedpg.hooks.LocalJob
    assert runner.Trainer is pfedpg.run.Trainer and job is pfedpg.jobs.LocalJob
    assert [w.category for w in caught] == [FutureWarning, FutureWarning]
    assert "pfedpg.run" in str(caught[0].message) and "pfedpg.jobs" in str(caught[1].message)


def test_no_run_class_inherits_from_another():
    """The run is composed, not inherited (issue 30): the round loop holds its clients, and the
    Flower engine brings its own ``Clients`` instead of subclassing the Trainer. No class anywhere in
    the packages derives from a class defined in ``pfedpg/run/`` or ``evaluations/flower/``."""
    run_dirs = [ROOT / "pfedpg" / "run", ROOT / "evaluations" / "flower"]
    run_classes = {node.name for d in run_dirs for f in sorted(d.glob("*.py"))
                   for node in ast.parse(f.read_text()).body if isinstance(node, ast.ClassDef)}
    assert {"Trainer", "RoundLoop", "InProcessClients", "FlowerClients"} <= run_classes
    offenders = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else ""
                         for b in node.bases}
                offenders += [f"{path.relative_to(ROOT)}: {node.name}({b})" for b in sorted(bases & run_classes)]
    assert not offenders, offenders
