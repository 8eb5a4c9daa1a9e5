"""What ``pfedpg-eval compare A B`` prints and writes, from one `Comparison`: the terminal's table
(accuracy in percent, differences in points), and with ``--out DIR`` ``compare.csv`` and
``compare.json`` (fractions, every number of the comparison), ``compare.md`` and ``compare.tex``
(the terminal's table as Markdown and as a booktabs table, in percent). An ``--out`` that holds the
files of a comparison of another A or B is refused (results are never replaced); the same A and B
are written again (a grid that has since gained cells gives the comparison as it now stands)."""
from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import click

from evaluations.compare_results import Comparison, Difference
from pfedpg import jsonio
from pfedpg.errors import ConfigError

FILES = ("compare.csv", "compare.json", "compare.md", "compare.tex")
CSV_COLUMNS = ["row", "setting", "metric", "unit", "n", "paired", "a", "b", "difference", "sd", "ci_low", "ci_high",
               "verdict", "note", "epsilon_a", "epsilon_b", "pooled_auc_a", "pooled_auc_b", "status_a", "status_b"]


def _value(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if math.isinf(v):
        return "∞"
    return {"fraction": f"{100 * v:.2f}", "auc": f"{v:.3f}", "epsilon": f"{v:.2f}"}.get(unit, f"{v:,.0f}")


def _signed(v: float, unit: str) -> str:
    return f"{100 * v:+.2f}" if unit == "fraction" else f"{v:+.3f}"


def _difference(d: Difference | None, unit: str, units: str = "seed") -> str:
    """``+2.22 [-5.01, +9.45]`` (points for accuracies); one unit: the difference alone, said so."""
    if d is None:
        return "—"
    if d.interval is None:
        return f"{_signed(d.mean, unit)} (1 {units})"
    return f"{_signed(d.mean, unit)} [{_signed(d.interval[0], unit)}, {_signed(d.interval[1], unit)}]"


def _pooled(p) -> str:
    if p is None:
        return "—"
    auc, lo, hi = p
    return f"{auc:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def _eps(a: float | None, b: float | None) -> str:
    return "—" if a is None and b is None else f"{_value(a, 'epsilon')} → {_value(b, 'epsilon')}"


def table(c: Comparison) -> tuple[list[str], list[list[str]]]:
    """The paired table's header and cells (the terminal's, compare.md's and compare.tex's)."""
    if c.kind == "run":
        header = ["", "A", "B", "B − A"]
        body = [[s.metric + (" %" if s.unit == "fraction" else ""), _value(s.a, s.unit), _value(s.b, s.unit),
                 "—" if s.a is None or s.b is None or math.isinf(s.a) or math.isinf(s.b)
                 else (_signed(s.b - s.a, "fraction") if s.unit == "fraction" else _value(s.b - s.a, s.unit))]
                for s in c.side_by_side]
        body += [[f"{r.metric} % per client (n = {len(r.difference.paired) if r.difference else 0})",
                  _value(r.a, r.unit), _value(r.b, r.unit), f"{_difference(r.difference, r.unit, 'client')}; "
                  f"{r.verdict}"] for r in c.rows]
        return header, body
    header = ["setting", "metric", "n", "A", "B", "B − A [95% CI]", "verdict"]
    has_eps = any(r.epsilon_a is not None or r.epsilon_b is not None for r in c.rows)
    has_pool = any(r.pooled_a or r.pooled_b for r in c.rows)
    header += ["ε A → B"] * has_eps + ["pooled AUC A", "pooled AUC B"] * has_pool + ["note"]
    body = []
    for r in c.rows:
        cells = [r.setting, r.metric + (" %" if r.unit == "fraction" else ""),
                 str(len(r.difference.paired)) if r.difference else "0", _value(r.a, r.unit), _value(r.b, r.unit),
                 _difference(r.difference, r.unit), r.verdict]
        cells += [_eps(r.epsilon_a, r.epsilon_b)] * has_eps + [_pooled(r.pooled_a), _pooled(r.pooled_b)] * has_pool
        body.append(cells + [r.note or ""])
    if body and not any(row[-1] for row in body):  # no row needs a note
        header, body = header[:-1], [row[:-1] for row in body]
    return header, body


def _intro(c: Comparison) -> list[str]:
    plural = {"run": "runs", "privacy sweep": "privacy sweeps", "audit": "audits",
              "robustness matrix": "robustness matrices"}[c.kind]
    lines = [f"compare two {plural}", f"  A: {c.a}", f"  B: {c.b}"]
    if c.changes:
        lines.append(f"what differs ({len(c.changes)} config key{'s' * (len(c.changes) != 1)}):")
        lines += [f"  {ch}" for ch in c.changes]
    else:
        lines.append("what differs: no config key (the same config)")
    return lines


def _explain(c: Comparison) -> str:
    if c.kind == "run":
        return ("Accuracy in %, differences in points. Per client: B − A with clients paired by id, its mean and 95% "
                "t-interval over the clients of this one seed (how consistent the change is across clients, not "
                "across reruns).")
    return ("Accuracy in %, differences in points (AUC as is). B − A over the seeds both grids hold for each setting "
            "(cells paired by name), mean and 95% t-interval; the verdict says B higher or B lower only when the "
            "interval excludes 0, from at least 3 paired seeds.")


def _aligned(header: list[str], body: list[list[str]]) -> list[str]:
    rows = [header] + body
    widths = [max(len(r[j]) for r in rows) for j in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def text(c: Comparison) -> str:
    """What the terminal shows."""
    header, body = table(c)
    import textwrap

    lines = _intro(c) + [""] + textwrap.wrap(_explain(c), 110) + [""] + _aligned(header, body)
    if c.unpaired:
        lines += ["", f"not compared ({len(c.unpaired)} cell{'s' * (len(c.unpaired) != 1)}):"]
        lines += [f"  {u}" for u in c.unpaired]
    lines += [f"note: {n}" for n in c.notes]
    if c.identical:
        lines.append("A and B are identical: the same config and every paired difference exactly 0.")
    return "\n".join(lines)


def markdown(c: Comparison) -> str:
    header, body = table(c)
    md = ["# Comparison", "", f"- A: `{c.a}`", f"- B: `{c.b}`", f"- kind: {c.kind}", ""]
    md += (["What differs:", ""] + [f"- `{ch.key}`: {str(ch).split(': ', 1)[1]}" for ch in c.changes]
           if c.changes else ["What differs: no config key (the same config)."])
    md += ["", _explain(c), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    if c.unpaired:
        md += ["", "Not compared:", ""] + [f"- {u}" for u in c.unpaired]
    md += [""] + [f"Note: {n}" for n in c.notes]
    return "\n".join(md).rstrip() + "\n"


def csv_rows(c: Comparison) -> list[dict]:
    """compare.csv's rows: fractions, one per side-by-side number, paired row and cell not compared."""
    out = [{"row": "side_by_side", "setting": "run", "metric": s.metric, "unit": s.unit, "a": s.a, "b": s.b,
            "difference": None if s.a is None or s.b is None else s.b - s.a} for s in c.side_by_side]
    for r in c.rows:
        d = r.difference
        out.append({"row": "paired", "setting": r.setting, "metric": r.metric, "unit": r.unit,
                    "n": len(d.paired) if d else 0, "paired": " ".join(map(str, d.paired)) if d else "",
                    "a": r.a, "b": r.b, "difference": d.mean if d else None, "sd": d.sd if d else None,
                    "ci_low": d.interval[0] if d and d.interval else None,
                    "ci_high": d.interval[1] if d and d.interval else None, "verdict": r.verdict, "note": r.note,
                    "epsilon_a": r.epsilon_a, "epsilon_b": r.epsilon_b,
                    "pooled_auc_a": r.pooled_a[0] if r.pooled_a else None,
                    "pooled_auc_b": r.pooled_b[0] if r.pooled_b else None})
    out += [{"row": "not_compared", "setting": u.cell, "status_a": u.a or "absent", "status_b": u.b or "absent",
             "note": u.error} for u in c.unpaired]
    return out


def check_out(c: Comparison, out: str | Path) -> None:
    """Refuse an ``out`` that cannot be written or holds the comparison of another A or B (before
    anything is printed or written)."""
    from evaluations.paths import check_writable

    d = Path(out)
    check_writable(d, "compare --out")
    record = d / "compare.json"
    here = [f for f in FILES if (d / f).exists()]
    if here:
        old = jsonio.read(record) if record.is_file() else {}
        same = [str(Path(old.get(k, "")).resolve()) if old.get(k) else None for k in ("a", "b")]
        if same != [str(c.a.resolve()), str(c.b.resolve())]:
            was = f"A {old.get('a')} and B {old.get('b')}" if old else "an unknown A and B (no compare.json)"
            raise ConfigError(f"{d} holds the comparison of {was} ({', '.join(here)}); pass another --out, or delete "
                              "those files (a comparison is never replaced silently)")


def write(c: Comparison, out: str | Path) -> list[Path]:
    """compare.csv, compare.json, compare.md and compare.tex in ``out`` (see the module docstring)."""
    from evaluations.latex import latex_table

    check_out(c, out)
    d = Path(out)
    record = d / "compare.json"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for row in csv_rows(c):
            w.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS})
    tree = dataclasses.asdict(c)
    tree.update(a=str(c.a.resolve()), b=str(c.b.resolve()), identical=c.identical)
    record.write_text(jsonio.dumps(tree, indent=1) + "\n")
    (d / "compare.md").write_text(markdown(c))
    header, body = table(c)
    changes = "; ".join(str(ch) for ch in c.changes) or "none (the same config)"
    caption = (f"{c.kind.capitalize()} B ({c.b.name}) against A ({c.a.name}); config keys that differ: {changes}. "
               + _explain(c))
    tex = latex_table(header, body, caption=caption, label="tab:pfedpg-compare", source="compare.tex")
    (d / "compare.tex").write_text(tex.replace("pfedpg-eval report DIR --format latex", "pfedpg-eval compare A B --out "
                                               "DIR", 1))
    return [d / f for f in FILES]


@click.command("compare", short_help="Compare two runs or two grids, paired by client or by seed.",
               epilog="Example: pfedpg-eval compare runs/privacy-lr0.25 runs/privacy-lr0.5 --out runs/compare")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@click.option("--out", metavar="DIR", help="also write compare.csv and compare.json (fractions), compare.md and "
              "compare.tex (percent, booktabs) into DIR; a DIR holding another A and B's comparison is refused, "
              "the same A and B's is written again")
def command(a: str, b: str, out: str | None) -> int:
    """Compare two run folders (summary.json) or two grid folders of one kind (sweep.yaml, audit.yaml or
    matrix.yaml with runs/): what config keys differ, then B − A.

    Two runs: mean and worst accuracy of the adapted and generated prompts, ε per DP mechanism, bytes per client
    per round side by side, and B − A per client (clients paired by id, only where both runs hold the same clients:
    same seed and data config) with its 95% t-interval. Two grids: cells paired by name (setting and seed); per
    setting B − A over the seeds both hold — accuracy (privacy sweep, audit; each probe's per-seed AUC and the
    pooled AUC for an audit), benign accuracy and ASR (robustness) — with n, mean, 95% t-interval and a verdict
    (B higher / B lower only when the interval excludes 0, from at least 3 seeds). Cells only one side holds, and
    failed or infeasible ones, are listed. Nothing is trained: the numbers come from each folder's summary.json or
    its grid table."""
    from evaluations.compare import compare

    c = compare(a, b)
    if out is not None:
        check_out(c, out)  # a refused --out prints only its one line
    print(text(c))
    if out is not None:
        files = write(c, out)
        print(f"written: {', '.join(str(f) for f in files)}")
    return 0
