"""LaTeX tables for a paper: each grid's Markdown table again as a booktabs table beside it
(``tradeoff.tex``, ``robustness.tex``, ``audit.tex``), and a run's accuracy table (``accuracy.tex``,
``pfedpg-eval report RUN_DIR --format latex``).

A grid's LaTeX table is written from the very header and cells of its Markdown table, so the two
never disagree: the same rows, the same numbers (mean ± sample sd over seeds, the paired difference
from ``local`` with its 95% interval, n seeds, the verdict). :func:`to_latex` turns one such cell
into LaTeX: ``_ % & # $ { } \\ ~ ^`` are escaped, ``±``, ``∞``, signed numbers and Greek letters
go into math (``$\\varepsilon$``, ``$-8.9$``), ``P_n`` becomes ``$P_n$``, Markdown's ``**bold**``,
``*emphasis*`` and backticks become ``\\textbf``, ``\\emph`` and ``\\texttt``. The files are table
environments to ``\\input`` into a paper whose preamble loads ``booktabs`` and ``graphicx`` (a table
wider than the line is shrunk to its width); nothing else is needed.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

#: characters LaTeX reads as commands in text, and what prints them
_SPECIAL = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#",
            "$": r"\$", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
            ">": r"\textgreater{}", "|": r"\textbar{}"}
#: non-ASCII characters the tables use, in text
_TEXT = {"—": "---", "–": "--", "…": r"\dots{}", "’": "'", "‘": "`", "“": "``", "”": "''", "\u00a0": "~",
         "½": r"$\frac{1}{2}$", "✓": "yes", "✗": "no"}
#: ... and in math
_MATH = {"ε": r"\varepsilon", "δ": r"\delta", "μ": r"\mu", "σ": r"\sigma", "α": r"\alpha", "β": r"\beta",
         "γ": r"\gamma", "λ": r"\lambda", "ρ": r"\rho", "τ": r"\tau", "Δ": r"\Delta", "±": r"\pm",
         "∞": r"\infty", "−": "-", "×": r"\times", "·": r"\cdot", "≥": r"\geq", "≤": r"\leq", "≈": r"\approx",
         "≠": r"\neq", "√": r"\surd", "→": r"\to", "←": r"\leftarrow", "∈": r"\in", "‖": r"\|"}
_ACCENT = {"\u0302": r"\hat", "\u0303": r"\tilde"}  # combining circumflex (ε̂), tilde (P̃)

_NUM = r"[+\-−]?(?:\d+(?:\.\d+)?|\.\d+)"
_GREEK = "εδμσαβγλρτ"
_TOKEN = re.compile("|".join([
    r"(?P<bold>\*\*(?P<bold_in>.+?)\*\*)",
    r"(?P<code>`(?P<code_in>[^`]+)`)",
    r"(?P<em>(?<![\w*])\*(?P<em_in>[^*\s][^*]*?)\*(?![\w*]))",
    rf"(?P<pm>(?<![\w.]){_NUM}\s*±\s*{_NUM}(?![\w.]))",
    r"(?P<sci>(?<![\w.])[+\-−]?\d+(?:\.\d+)?e[+\-]\d+(?![\w.]))",
    r"(?P<signed>(?<![\w.\-−+])[+\-−](?:\d+(?:\.\d+)?|\.\d+)(?![\w.]))",
    rf"(?P<sub>(?<![A-Za-z{_GREEK}])(?P<base>Δ?[A-Za-z{_GREEK}])(?P<acc>[\u0302\u0303])?_(?P<idx>[A-Za-z0-9]+))",
    rf"(?P<accented>(?P<abase>[A-Za-z{_GREEK}])(?P<aacc>[\u0302\u0303]))",
]))


def _math_char(c: str) -> str:
    return _MATH.get(c, c)


def _math_text(s: str) -> str:
    """A run of plain characters in math (numbers, signs, Greek letters)."""
    out = "".join(_math_char(c) + (" " if c in _MATH and _MATH[c].startswith("\\") else "") for c in s)
    return re.sub(r"\s+", " ", out).strip()


def _escape(s: str) -> str:
    """Plain text: LaTeX's special characters escaped, the tables' non-ASCII characters replaced."""
    out = []
    for c in s:
        if c in _SPECIAL:
            out.append(_SPECIAL[c])
        elif c in _TEXT:
            out.append(_TEXT[c])
        elif c in _MATH:
            out.append(f"${_MATH[c]}$")
        else:
            out.append(c)
    return "".join(out)


def to_latex(s: str) -> str:
    """One Markdown table cell (or caption) as LaTeX text (see the module's docstring)."""
    out, pos = [], 0
    for m in _TOKEN.finditer(s):
        out.append(_escape(s[pos:m.start()]))
        pos = m.end()
        if m["bold"]:
            out.append(r"\textbf{" + to_latex(m["bold_in"]) + "}")
        elif m["code"]:
            out.append(r"\texttt{" + _escape(m["code_in"]) + "}")
        elif m["em"]:
            out.append(r"\emph{" + to_latex(m["em_in"]) + "}")
        elif m["pm"] or m["signed"]:
            out.append("$" + _math_text(m[0]) + "$")
        elif m["sci"]:
            mant, exp = re.split("e", m[0].replace("−", "-"))
            out.append(f"${mant} \\times 10^{{{int(exp)}}}$")
        elif m["sub"]:
            base = "".join(_math_char(c) + (" " if c == "Δ" else "") for c in m["base"])
            if m["acc"]:
                base = base[:-1] + _ACCENT[m["acc"]] + "{" + _math_char(m["base"][-1]) + "}"
            idx = m["idx"] if len(m["idx"]) == 1 else r"{\mathrm{" + m["idx"] + "}}"
            out.append(f"${base}_{idx}$")
        else:  # accented
            out.append(f"${_ACCENT[m['aacc']]}{{{_math_char(m['abase'])}}}$")
    out.append(_escape(s[pos:]))
    return re.sub(r"(?<!\\)\$\$", "", "".join(out))  # two adjacent math runs read as one


_NUMERIC_CELL = re.compile(r"^[\s\d.,+\-−±∞—\[\]%()]*$|^(?:unresolved|n/a)$")


def _header_cell(h: str, align: str, width: int = 16) -> str:
    """A header on short lines, so that headers do not set the columns' widths: ``name (details)``
    puts the details below the name, and each part wraps at spaces after ``width`` characters."""
    lines: list[str] = []
    name, sep, rest = h.partition(" (")
    for part in (name, "(" + rest if sep else ""):
        line = ""
        for word in part.split():
            if line and len(line) + 1 + len(word) > width:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        if line:
            lines.append(line)
    if len(lines) < 2:
        return to_latex(h)
    return (rf"\begin{{tabular}}[b]{{@{{}}{align}@{{}}}}" + r"\\".join(to_latex(ln) for ln in lines)
            + r"\end{tabular}")


def latex_table(header: list[str], body: list[list[str]], *, caption: str, label: str, source: str,
                rules_before: tuple[int, ...] = (), long_cells: int = 48) -> str:
    """A booktabs table (``table*``: it spans both columns of a two-column paper) of the Markdown
    table ``header`` / ``body``: numeric columns right-aligned, columns with cells longer than
    ``long_cells`` characters as ragged-right paragraphs sharing the line, a ``\\midrule`` before
    each row index in ``rules_before``. ``caption`` is Markdown like the cells; ``source`` names
    what the table was written from (a comment at the top)."""
    from pfedpg import __version__

    cols = list(zip(*body)) if body else [()] * len(header)
    long = [any(len(c) > long_cells for c in col) for col in cols]
    width = 0.85 / max(1, sum(long))
    spec = []
    for col, is_long in zip(cols, long):
        if is_long:
            spec.append(rf"p{{{width:.3f}\linewidth}}")
        else:
            spec.append("r" if col and all(_NUMERIC_CELL.match(c) for c in col) and any(c.strip() for c in col)
                        else "l")
    end = r" \tabularnewline" if any(long) else r" \\"

    def cells(row: list[str], head: bool = False) -> str:
        out = []
        for c, s, is_long in zip(row, spec, long):
            text = _header_cell(c, "l" if is_long else s) if head else to_latex(c)
            out.append((r"\raggedright " if is_long and text else "") + text)
        return " & ".join(out) + end

    lines = [f"% {source}: written by pfedpg-eval {__version__} from the cells of its Markdown table; "
             "regenerate it with pfedpg-eval report DIR --format latex.",
             r"% Needs \usepackage{booktabs} and \usepackage{graphicx} in the preamble (a table wider than the line "
             "is shrunk to its width).",
             r"\begin{table*}[t]", r"\centering", r"\caption{" + to_latex(caption) + "}", r"\label{" + label + "}",
             r"\footnotesize", r"\setlength{\tabcolsep}{3pt}",
             r"\setbox0\hbox{%",
             r"\begin{tabular}{" + "".join(spec) + "}",
             r"\toprule", cells(header, head=True), r"\midrule"]
    for i, row in enumerate(body):
        if i in rules_before and i > 0:
            lines.append(r"\midrule")
        lines.append(cells(row))
    lines += [r"\bottomrule", r"\end{tabular}}",
              r"\ifdim\wd0>\linewidth\resizebox{\linewidth}{!}{\box0}\else\box0\fi", r"\end{table*}", ""]
    return "\n".join(lines)


def _seeds(rows: list[dict[str, Any]]) -> str:
    seeds = sorted({r["seed"] for r in rows if r.get("status") in ("ok", "diverged")})
    return f"n = {len(seeds)}" + (f": seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, seeds))}"
                                  if seeds else "")


def privacy_table(path: Path, header: list[str], body: list[list[str]], rows: list[dict[str, Any]]) -> Path:
    """``tradeoff.tex`` of the privacy sweep, from ``tradeoff.md``'s header and cells."""
    caption = ("Accuracy–privacy trade-off of pFedPG. Accuracy % per client on its own test split after the last "
               f"round, mean ± sample sd over seeds ({_seeds(rows)}; one seed: no spread); ε is the largest over "
               "clients, in each row's own privacy unit (client-level and record-level ε are not comparable). "
               "− local: the difference from `local` (which sends nothing) in points, paired by seed, with its 95% "
               "t-interval; the verdict is *dominated* or *above local* only when that interval excludes zero, "
               "from at least three paired seeds.")
    path.write_text(latex_table(header, body, caption=caption, label="tab:pfedpg-privacy-tradeoff",
                                source=path.name))
    return path


def robustness_table(path: Path, header: list[str], body: list[list[str]], rows: list[dict[str, Any]]) -> Path:
    """``robustness.tex`` of the robustness matrix, from ``robustness.md``'s header and cells (a rule
    before the worst-case rows)."""
    caption = ("Robustness of pFedPG. Benign accuracy %: mean over the non-malicious clients of their own test "
               f"accuracy after the last round, mean ± sample sd over seeds ({_seeds(rows)}; one seed: no spread). "
               "ASR: the backdoor's success rate on the benign clients' models. Excluded: client updates the rule "
               "left out over the run (malicious / benign), a count. *diverged*: the attack drove training to "
               "non-finite values, its accuracy as measured in that round; *infeasible*: the rule cannot run at "
               "this (m, f). The worst-case rows give, per defense and malicious fraction, the attack with the "
               "lowest benign accuracy.")
    worst = tuple(i for i, r in enumerate(body) if r[1].startswith("**worst case**"))
    path.write_text(latex_table(header, body, caption=caption, label="tab:pfedpg-robustness", source=path.name,
                                rules_before=worst[:1]))
    return path


def audit_table(path: Path, header: list[str], body: list[list[str]], rows: list[dict[str, Any]]) -> Path:
    """``audit.tex`` of the leakage audit, from its Markdown table's header and cells (one row per
    probe, one column per group)."""
    caption = ("Leakage audit of pFedPG. Each probe's scores pooled over seeds "
               f"({_seeds(rows)}) and target clients, one column per group. AUC 0.5 = chance; TPR at 1% and 0.1% "
               "FPR with the 95% bootstrap interval that refits the threshold, *unresolved* where too few "
               "negatives were pooled or tied scores leave no threshold near that FPR; neg.: the non-members "
               "pooled. One-run audits: ε_lb, a 95% lower bound on ε, with its cap and the claim it tests.")
    path.write_text(latex_table(header, body, caption=caption, label="tab:pfedpg-leakage-audit", source=path.name))
    return path


def run_table(run_dir: Path) -> Path:
    """``accuracy.tex`` of one finished run: the adapted (and generated) prompt's per-client
    accuracy, mean, worst, best and sd over clients, as the run's report.md gives them."""
    s = json.loads((run_dir / "summary.json").read_text())
    acc, gen = s.get("accuracy"), s.get("accuracy_generated")
    if acc is None:
        from pfedpg.errors import ConfigError

        raise ConfigError(f"{str(run_dir)!r}: the server does not hold the clients' accuracies "
                          f"({s.get('client_metrics')}); there is no accuracy table to write")

    def pct(v):
        return "—" if v is None else f"{100 * v:.2f}"

    body = [["adapted P̃_n + head H_n", *(pct(acc[k]) for k in ("mean", "worst", "best", "std"))]]
    if gen:
        body.append(["generated P_n + head H_n", *(pct(gen[k]) for k in ("mean", "worst", "best", "std"))])
    split = "validation" if s.get("evaluated_on") == "val" else "test"
    caption = (f"Run {run_dir.name}: method {s['method']}, seed {s['seed']}, {s['rounds']} rounds, "
               f"{s['num_clients']} clients. Per-client accuracy % on each client's own {split} split after the "
               "last round (never the best one): mean, worst and best client, and the sd over clients.")
    path = run_dir / "accuracy.tex"
    path.write_text(latex_table(["prompt", "mean", "worst", "best", "sd over clients"], body, caption=caption,
                                label="tab:pfedpg-run-accuracy", source=path.name))
    return path
