"""Measures of the code's shape, read from the source with ``ast`` (nothing is run): issue 30's
before → after numbers, for any checkout.

    python bench/architecture.py [ROOT]

Prints, for the run (``pfedpg/run/``) and the Flower wing (``evaluations/flower/``):

- the largest class with its bases' methods and attributes folded in (a mixin's methods are the
  class's): methods, distinct ``self.x = ...`` attributes, lines;
- the classes there that inherit from another class of the run or the wing;
- attributes read across parts: for each class, the ``self.x`` it reads but never sets, that another
  class of the run sets (the coupling that makes a mixin unreadable alone), summed;

and over the four packages: ``hasattr`` calls, and ``isinstance`` tests against a hook, server,
generator, rule or probe class (type probing that a registry or a protocol should replace).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("pfedpg", "attacks", "defenses", "evaluations")
PLUGGABLE_BASES = {"Hook", "Server", "PromptGenerator", "Rule", "Probe", "Trainer", "PrivacyMechanism"}


def classes(root: Path, folders: tuple[str, ...]) -> dict[str, tuple[ast.ClassDef, Path]]:
    out = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    out[node.name] = (node, path)
    return out


def own(node: ast.ClassDef) -> tuple[set[str], set[str], set[str]]:
    """(methods, attributes set on self, attributes read from self) of one class body."""
    methods = {f.name for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    sets, reads = set(), set()
    for stmt in node.body:  # class-level fields (a dataclass's, a ClassVar) are the class's own
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            sets.add(stmt.target.id)
        elif isinstance(stmt, ast.Assign):
            sets.update(t.id for t in stmt.targets if isinstance(t, ast.Name))
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self":
            (sets if isinstance(n.ctx, ast.Store) else reads).add(n.attr)
    return methods, sets, reads


def folded(name: str, table: dict) -> tuple[set[str], set[str], int]:
    """Methods, attributes and lines of ``name`` with every base defined in ``table`` folded in."""
    node, _ = table[name]
    methods, sets, _ = own(node)
    lines = node.end_lineno - node.lineno + 1
    for base in node.bases:
        if isinstance(base, ast.Name) and base.id in table and base.id != name:
            m, s, n = folded(base.id, table)
            methods, sets, lines = methods | m, sets | s, lines + n
    return methods, sets, lines


def measure_run(root: Path) -> None:
    table = classes(root, ("pfedpg/run", "evaluations/flower"))
    if not table:
        print("no classes under pfedpg/run or evaluations/flower")
        return
    sizes = {n: folded(n, table) for n in table}
    big = max(sizes, key=lambda n: (len(sizes[n][0]), len(sizes[n][1])))
    m, s, lines = sizes[big]
    print(f"largest class: {big} ({table[big][1].relative_to(root)}): {len(m)} methods, {len(s)} attributes, "
          f"{lines} lines with its bases")
    inherit = [f"{n}({', '.join(b.id for b in node.bases if isinstance(b, ast.Name) and b.id in table)})"
               for n, (node, _) in table.items()
               if any(isinstance(b, ast.Name) and b.id in table for b in node.bases)]
    print(f"classes inheriting from a run class: {len(inherit)}" + (f" — {', '.join(inherit)}" if inherit else ""))
    setters: dict[str, set[str]] = {}
    for n, (node, _) in table.items():
        for a in own(node)[1]:
            setters.setdefault(a, set()).add(n)
    cross = {}
    for n, (node, _) in table.items():
        methods, sets, reads = own(node)
        foreign = {a for a in reads - sets - methods if setters.get(a, set()) - {n}}
        if foreign:
            cross[n] = foreign
    total = sum(len(v) for v in cross.values())
    print(f"attributes read across parts: {total} — "
          + ", ".join(f"{n} {len(v)}" for n, v in sorted(cross.items(), key=lambda kv: -len(kv[1]))))


def measure_probing(root: Path) -> None:
    table = classes(root, PACKAGES)

    def pluggable(name: str, seen=()) -> bool:
        if name in PLUGGABLE_BASES:
            return True
        node = table.get(name, (None,))[0]
        return node is not None and name not in seen and any(
            isinstance(b, ast.Name) and pluggable(b.id, (*seen, name)) for b in node.bases)

    found = []
    for folder in PACKAGES:
        for path in sorted((root / folder).rglob("*.py")):
            for n in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and len(n.args) == 2):
                    continue
                where = f"{path.relative_to(root)}:{n.lineno}"
                if n.func.id == "hasattr":
                    found.append(f"hasattr {where}")
                elif n.func.id == "isinstance":
                    kinds = n.args[1].elts if isinstance(n.args[1], ast.Tuple) else [n.args[1]]
                    if any(isinstance(k, ast.Name) and pluggable(k.id) for k in kinds):
                        found.append(f"isinstance {where}")
    print(f"hasattr calls and isinstance on pluggable classes: {len(found)}"
          + (f" — {'; '.join(found)}" if found else ""))


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    measure_run(root)
    measure_probing(root)
