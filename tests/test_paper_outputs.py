"""Paper-ready outputs: each grid's LaTeX table (booktabs, the Markdown table's rows, the CSV's numbers,
escaped), every plot also as a PDF, and ``pfedpg-eval report DIR --format ...`` rewriting them."""
import csv
import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest

from evaluations.latex import audit_table, to_latex

SPECIAL = "dp_x&y#1 50%~^{}$\\"  # a mechanism name with every character LaTeX reads as a command


def test_cells_become_latex():
    cases = {
        "52.9 ± 4.6": r"$52.9 \pm 4.6$",
        "−8.9 [−31.1, +13.4]": r"$-8.9$ [$-31.1$, $+13.4$]",
        "− local (points, paired; 95% CI)": r"$-$ local (points, paired; 95\% CI)",
        "ε (max client)": r"$\varepsilon$ (max client)",
        "generated P_n %": r"generated $P_n$ \%",
        "adapted P̃_n + head H_n": r"adapted $\tilde{P}_n$ + head $H_n$",
        "ε_lb 7.21 at δ 1e-05, ε̂ 3.2": r"$\varepsilon_{\mathrm{lb}}$ 7.21 at $\delta$ $1 \times 10^{-5}$, "
                                      r"$\hat{\varepsilon}$ 3.2",
        "**worst case** (sign_flip)": r"\textbf{worst case} (sign\_flip)",
        "*dominated* vs `local`, ∞, —": r"\emph{dominated} vs \texttt{local}, $\infty$, ---",
        SPECIAL: r"dp\_x\&y\#1 50\%\textasciitilde{}\textasciicircum{}\{\}\$\textbackslash{}",
        "dp_client-eps8-s1": r"dp\_client-eps8-s1",
    }
    for cell, tex in cases.items():
        assert to_latex(cell) == tex, cell


# --- the tables, from grids written with planted rows -----------------------------------------------
def privacy_rows(tmp_path):
    from evaluations.privacy import COLUMNS, STATEMENT_KEYS

    accs = {("local", None): [0.50, 0.55, 0.52], ("nonprivate", None): [0.70, 0.78, 0.75],
            ("dp_client", 8.0): [0.61, 0.66, 0.60], ("dp_sgd", 2.0): [0.31, 0.27, 0.25],
            (SPECIAL, None): [0.4, 0.45, 0.5]}
    rows = []
    for seed in (0, 1, 2):
        for (mech, eps), acc in accs.items():
            r = {k: None for k in COLUMNS}
            r.update(cell=f"{mech}-s{seed}", mechanism=mech, seed=seed, status="ok", accuracy_mean=acc[seed],
                     accuracy_worst=acc[seed] - 0.1, target_epsilon=eps, run_dir=str(tmp_path / "runs" / str(seed)),
                     epsilon_max=math.inf if mech == "nonprivate" else eps and eps * 0.99)
            if eps is not None or mech == SPECIAL:
                r.update(noise_multiplier=1.1, delta=1e-5, _unit="record" if mech == "dp_sgd" else "client_level",
                         _statement={k: f"{k} of {mech}" for k in STATEMENT_KEYS})
            rows.append(r)
    failed = {k: None for k in COLUMNS}
    failed.update(cell="dp_sgd-eps0.5-s0", mechanism="dp_sgd", seed=0, status="failed", target_epsilon=0.5,
                  error="ConfigError: delta = 1.0 must be < 1/|D_n|", run_dir=str(tmp_path / "runs" / "f"))
    return rows + [failed]


def tex_body(tex: str) -> list[list[str]]:
    """The body rows of a generated table, split into cells."""
    lines = tex.splitlines()
    start = lines.index(r"\midrule") + 1
    rows = [ln for ln in lines[start:lines.index(r"\bottomrule")] if ln != r"\midrule"]
    return [[c.strip() for c in re.split(r"(?<!\\)&", re.sub(r"\\\\$|\\tabularnewline$", "", r))] for r in rows]


def md_table(md: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return cells[0], cells[2:]


def assert_clean_latex(tex: str) -> None:
    """booktabs, a caption and label, pure ASCII, and LaTeX's special characters escaped outside math."""
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\caption{", r"\label{tab:"):
        assert rule in tex, rule
    assert tex.index(r"\toprule") < tex.index(r"\midrule") < tex.index(r"\bottomrule")
    assert tex.isascii()
    for ln in tex.splitlines():
        if ln.startswith("%"):
            continue
        text = re.sub(r"(?<!\\)\$.*?(?<!\\)\$", "", ln.removesuffix("%"))  # math removed
        assert not re.search(r"(?<!\\)[_%#]", text), ln  # no raw _ (nor % or #) outside math


def test_tradeoff_tex_has_the_markdown_rows_and_the_csv_numbers(tmp_path):
    from scipy.stats import t

    from evaluations.privacy import PrivacySweepConfig, write_outputs

    write_outputs(tmp_path, privacy_rows(tmp_path), PrivacySweepConfig())
    tex = (tmp_path / "tradeoff.tex").read_text()
    assert_clean_latex(tex)
    header, md_body = md_table((tmp_path / "tradeoff.md").read_text())
    body = tex_body(tex)
    assert len(body) == len(md_body) == 5 and all(len(r) == len(header) for r in body)  # the failed row is no row
    col = {h: i for i, h in enumerate(header)}
    with open(tmp_path / "tradeoff.csv") as f:
        csv_rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    by_mech: dict[str, dict[int, float]] = {}
    for r in csv_rows:
        by_mech.setdefault(r["mechanism"], {})[int(r["seed"])] = float(r["accuracy_mean"])
    local = by_mech["local"]
    for tex_row, md_row in zip(body, md_body):
        mech = md_row[0]
        accs = list(by_mech[mech].values())
        nums = [float(x) for x in re.findall(r"[+-]?\d+\.\d+", tex_row[col["accuracy % (mean)"]])]
        assert nums == [round(100 * float(np.mean(accs)), 1), round(100 * float(np.std(accs, ddof=1)), 1)]
        assert tex_row[col["seeds"]] == str(len(accs)) == "3"
        assert r"\pm" in tex_row[col["accuracy % (mean)"]]
        if mech != "local":  # the paired difference and its 95% t-interval, in points
            d = [100 * (by_mech[mech][s] - local[s]) for s in sorted(local)]
            half = t.ppf(0.975, len(d) - 1) * np.std(d, ddof=1) / math.sqrt(len(d))
            got = [float(x) for x in re.findall(r"[+-]?\d+\.\d+", tex_row[col["− local (points, paired; 95% CI)"]])]
            assert got == [round(v, 1) for v in (np.mean(d), np.mean(d) - half, np.mean(d) + half)]
        assert tex_row[col["vs local"]] == to_latex(md_row[col["vs local"]])  # the verdict
        assert tex_row[0] == to_latex(mech)
    assert [r[0] for r in body][-1] == r"dp\_x\&y\#1 50\%\textasciitilde{}\textasciicircum{}\{\}\$\textbackslash{}"
    assert r"client\_level" in tex and "dominated" in tex and r"$\varepsilon$" in tex and "n = 3: seeds 0, 1, 2" in tex


def robustness_rows(tmp_path):
    from evaluations.robustness import COLUMNS

    cells = [("none", None, "sum", 0.0, [0.90, 0.88]), ("none", None, "median", 0.0, [0.86, 0.87]),
             ("sign_flip", "grad", "sum", 0.25, [0.30, 0.41]), ("sign_flip", "grad", "median", 0.25, [0.80, 0.79]),
             ("backdoor", "delta", "median", 0.25, [0.84, 0.83]), ("sign_flip", "grad", "krum", 0.25, None)]
    rows = []
    for seed in (0, 1):
        for attack, space, defense, frac, acc in cells:
            r = {k: None for k in COLUMNS}
            r.update(cell=f"{attack}-{defense}-frac{frac:g}-s{seed}", attack=attack, space=space, defense=defense,
                     malicious_fraction=frac, num_malicious=int(frac * 4), seed=seed)
            if acc is None:
                r.update(status="infeasible", error="krum with f=1 needs m >= 5, the run has m=4")
            else:
                r.update(status="ok", benign_accuracy_mean=acc[seed], benign_accuracy_worst=acc[seed] - 0.05,
                         excluded_true=seed, excluded_false=1, aggregation_ms=0.5,
                         asr=0.1 * (seed + 1) if attack == "backdoor" else None,
                         run_dir=str(tmp_path / "runs" / str(seed)))
            rows.append(r)
    return rows


def test_robustness_tex_has_the_markdown_rows_and_the_csv_numbers(tmp_path):
    from evaluations.robustness import write_outputs

    write_outputs(tmp_path, robustness_rows(tmp_path))
    tex = (tmp_path / "robustness.tex").read_text()
    assert_clean_latex(tex)
    header, md_body = md_table((tmp_path / "robustness.md").read_text())
    body = tex_body(tex)
    assert len(body) == len(md_body) == 6 + 2  # six cells; worst cases at 0.25 for median and sum (krum: infeasible)
    lines = tex.splitlines()
    first_worst = next(i for i, ln in enumerate(lines) if r"\textbf{worst case}" in ln)
    assert lines[first_worst - 1] == r"\midrule"  # a rule sets the worst cases apart
    with open(tmp_path / "robustness.csv") as f:
        by = {}
        for r in csv.DictReader(f):
            by.setdefault((r["attack"], r["defense"], r["malicious_fraction"]), []).append(r)
    col = {h: i for i, h in enumerate(header)}
    for tex_row, md_row in zip(body, md_body):
        if md_row[1].startswith("**"):
            continue
        rs = by[(md_row[1], md_row[3], str(float(md_row[0])))]
        got = [float(x) for x in re.findall(r"[+-]?\d+\.\d+", tex_row[col["benign acc % (mean)"]])]
        if rs[0]["status"] == "infeasible":
            assert got == [] and tex_row[col["status"]] == "infeasible"
            continue
        accs = [float(r["benign_accuracy_mean"]) for r in rs]
        assert got == [round(100 * float(np.mean(accs)), 1), round(100 * float(np.std(accs, ddof=1)), 1)]
        assert tex_row[col["seeds"]] == str(len(rs))


def test_the_tables_compile_with_pdflatex(tmp_path):
    """Skipped where no pdflatex is installed (e.g. apt-get install texlive-latex-recommended)."""
    exe = shutil.which("pdflatex")
    if exe is None:
        pytest.skip("no pdflatex on this machine: the structural tests above still check every table")
    from evaluations.privacy import PrivacySweepConfig
    from evaluations.privacy import write_outputs as privacy_outputs
    from evaluations.robustness import write_outputs as robustness_outputs

    privacy_outputs(tmp_path, privacy_rows(tmp_path), PrivacySweepConfig())
    robustness_outputs(tmp_path, robustness_rows(tmp_path))
    long = ("releases: ε_lb 8.62 (cap 18.99) vs claim 7.43 at δ 1e-05: can fail, **VIOLATION** (p = 0.015 at the "
            "claim) [Steinke 1.74; estimate ε̂ 11.12, above its cap 3.89]; 60 canary clients, μ-GDP, accountant 8.00")
    audit_table(tmp_path / "audit.tex", ["probe", "nonprivate (ε ∞)", "dp_client-eps8 (ε 8.00)"],
                [["loss", "AUC 0.512; TPR@1% unresolved; TPR@0.1% unresolved; 80 neg.", "—"],
                 ["client_canary", long, long]], [{"seed": 0, "status": "ok"}])
    assert_clean_latex((tmp_path / "audit.tex").read_text())
    (tmp_path / "paper.tex").write_text("\n".join([
        r"\documentclass{article}", r"\usepackage{booktabs}", r"\usepackage{graphicx}", r"\begin{document}",
        r"\input{tradeoff.tex}", r"\input{robustness.tex}", r"\input{audit.tex}",
        r"\includegraphics[width=\linewidth]{accuracy_vs_epsilon.pdf}", r"\end{document}", ""]))
    out = subprocess.run([exe, "-interaction=nonstopmode", "-halt-on-error", "paper.tex"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    log = (tmp_path / "paper.log").read_text(errors="replace")
    assert "Missing character" not in log and "Undefined control sequence" not in log
    assert (tmp_path / "paper.pdf").read_bytes().startswith(b"%PDF")


def test_every_plot_is_also_a_pdf(tmp_path):
    from attacks.metrics import plot_roc
    from evaluations.leakage_pooling import plot_tpr_vs_epsilon
    from evaluations.plots import learning_curve
    from evaluations.privacy import PrivacySweepConfig
    from evaluations.privacy import write_outputs as privacy_outputs
    from evaluations.robustness import write_outputs as robustness_outputs

    privacy_outputs(tmp_path, privacy_rows(tmp_path), PrivacySweepConfig())
    robustness_outputs(tmp_path, robustness_rows(tmp_path))
    rng = np.random.default_rng(0)
    plot_roc(tmp_path / "roc_nonprivate.png", {"loss": (rng.normal(size=200), np.arange(200) % 2)})
    tpr = {"probes": {"loss": {"tpr_at_1pct_fpr": {"value": 0.05}, "tpr_at_0.1pct_fpr": {"value": "unresolved"}}}}
    plot_tpr_vs_epsilon(tmp_path / "tpr_vs_epsilon.png",
                        {"nonprivate": {**tpr, "dp": None},
                         "dp_client-eps8": {**tpr, "dp": {"epsilon": 8.0, "hook": "dp_client", "unit": "client"}}})
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"type": "round", "round": k, "acc_adapted_mean": 0.5 + k / 10, "acc_adapted_worst": 0.4}) + "\n"
        for k in (1, 2)))
    learning_curve(tmp_path)
    names = ["accuracy_vs_epsilon", "heatmap", "worst_case", "roc_nonprivate", "tpr_vs_epsilon", "learning_curve"]
    first = {}
    for name in names:
        assert (tmp_path / f"{name}.png").read_bytes().startswith(b"\x89PNG"), name
        first[name] = (tmp_path / f"{name}.pdf").read_bytes()
        assert first[name].startswith(b"%PDF"), name
    learning_curve(tmp_path)  # the same numbers again: the same file (no creation date)
    assert (tmp_path / "learning_curve.pdf").read_bytes() == first["learning_curve"]


# --- pfedpg-eval report DIR --format ... -------------------------------------------------------------
def test_a_failed_cells_error_is_read_back_as_its_row_held_it():
    import traceback

    from evaluations.executors import outcome
    from evaluations.regenerate import last_error
    from pfedpg.errors import ConfigError

    for message in ("dp_client: delta=0.5 must be < 1/N", "two lines:\nthe second"):
        try:
            try:
                raise KeyError("inner")
            except KeyError:
                raise ConfigError(message) from None
        except ConfigError as e:
            _, error, trace = outcome(e)  # what a grid records: the row's error and error.txt
            assert "Traceback" in trace and error == f"ConfigError: {message}"
            assert last_error(trace) == error
            assert last_error("".join(traceback.format_exception(e)) + "\n") == error
    assert last_error("ConfigError: alone\n") == "ConfigError: alone"


def test_report_rewrites_a_sweeps_latex_markdown_and_html_identically(tmp_path, capsys):
    from test_privacy_sweep import sweep_file

    from evaluations.cli import main

    path = sweep_file(tmp_path, mechanisms={}, baselines=["nonprivate", "local"])  # two cells
    assert main(["privacy", "--config", str(path)]) == 0
    out = tmp_path / "sweep"
    assert "tradeoff.tex" in capsys.readouterr().out
    files = {"latex": ["tradeoff.tex", "accuracy_vs_epsilon.pdf"],
             "markdown": ["tradeoff.md", "report.md", "accuracy_vs_epsilon.png"], "html": ["report.html"]}
    before = {f: (out / f).read_bytes() for fs in files.values() for f in fs}
    for fmt, names in files.items():
        for f in before:
            (out / f).unlink(missing_ok=True)
        assert main(["report", str(out), "--format", fmt]) == 0
        assert set(capsys.readouterr().out.split()) == {str(out / f) for f in names}
        for f in before:  # this format's files again, byte for byte; no other format's
            assert (out / f).is_file() == (f in names), (fmt, f)
            if f in names:
                assert (out / f).read_bytes() == before[f], (fmt, f)
    # A run folder: report.md as before (default), accuracy.tex with --format latex; no HTML for a run.
    run = out / "runs" / "nonprivate-s0"
    assert main(["report", str(run)]) == 0 and str(run / "report.md") in capsys.readouterr().out
    assert main(["report", str(run), "--format", "latex"]) == 0
    acc = (run / "accuracy.tex").read_text()
    assert_clean_latex(acc)
    mean = json.loads((run / "summary.json").read_text())["accuracy"]["mean"]
    assert f"{100 * mean:.2f}" in tex_body(acc)[0][1] and (run / "learning_curve.pdf").is_file()
    assert main(["report", str(run), "--format", "html"]) == 2
    assert "--format markdown or --format latex" in capsys.readouterr().err
    # A grid with a cell missing is refused in one line; nothing is rewritten.
    (out / "runs" / "local-s0").rename(tmp_path / "moved")
    assert main(["report", str(out), "--format", "latex"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cell local-s0" in err[0] and "has no folder" in err[0] and "--out" in err[0]
