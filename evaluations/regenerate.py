"""``pfedpg-eval report DIR [--format latex|markdown|html]``: a run's or a grid's report files
written again from what its folder holds, without training anything.

A run folder (``config.yaml``, ``summary.json``): ``markdown`` (the default) rewrites ``report.md``
and the learning curve (PNG and PDF), ``latex`` writes ``accuracy.tex`` and the learning curve.

A grid folder — a privacy sweep, an audit or a robustness matrix, told apart by the settings file the
grid wrote (``sweep.yaml``, ``audit.yaml``, ``matrix.yaml``) — has its cells' rows read back from
``runs/CELL`` (a finished run, a divergence, or the error a failed cell left) exactly as a rerun of
the grid command reads them, and its outputs written as the grid writes them, into a scratch folder;
the files of the asked format then replace those in the grid folder: ``latex`` the LaTeX table
(``tradeoff.tex``, ``audit.tex``, ``robustness.tex``) and every plot's PDF, ``markdown`` the Markdown
table, ``report.md`` and every plot's PNG, ``html`` ``report.html``. The data files (CSV, JSON) are
left as the grid wrote them. A grid whose cells have not all run (a folder missing or unfinished) is
refused: rerun the grid command, which finishes it and writes every file.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import yaml

from pfedpg.errors import ConfigError

FORMATS = ("markdown", "latex", "html")
#: the settings file a grid writes into its folder -> (the grid, its section in that file)
SETTINGS = {"sweep.yaml": ("privacy sweep", "privacy"), "audit.yaml": ("audit", "audit"),
            "matrix.yaml": ("robustness matrix", "robustness")}
#: which of a grid's files each format rewrites
PATTERNS = {"latex": ("*.tex", "*.pdf"), "markdown": ("*.md", "*.png"), "html": ("report.html",)}


def regenerate(path: str | Path, fmt: str = "markdown") -> list[Path]:
    """Write ``path``'s report files of format ``fmt`` again (see the module docstring); returns them."""
    d = Path(path)
    if fmt not in FORMATS:
        raise ConfigError(f"unknown report format {fmt!r}; choose from {', '.join(FORMATS)}")
    if not d.exists():
        raise ConfigError(f"no such run directory {str(d)!r}; pass a run's directory (the one holding summary.json) "
                          "or a grid's (the one holding sweep.yaml, audit.yaml or matrix.yaml)")
    if not d.is_dir():
        raise ConfigError(f"{str(d)!r} is a file; pass the run directory that holds it")
    settings = next((f for f in SETTINGS if (d / f).is_file()), None)
    if settings is not None and (d / "runs").is_dir() and not (d / "summary.json").is_file():
        return _grid(d, settings, fmt)
    kind = next((k for f, k in (("tradeoff.csv", "privacy sweep"), ("robustness.csv", "robustness matrix"),
                                ("audit.json", "audit")) if (d / f).is_file()), None)
    if kind is not None and not (d / "summary.json").is_file():
        raise ConfigError(f"{str(d)!r} is a {kind} directory without the settings file its grid writes (or its "
                          f"runs/): its report is {d / 'report.md'}; rerun the {kind.split()[0]} command with --out "
                          f"{d} to write it again, or pass one of its runs ({d / 'runs'}/<cell>)")
    if not (d / "config.yaml").is_file() and not (d / "summary.json").is_file():
        raise ConfigError(f"{str(d)!r} is not a run directory (no config.yaml) nor a grid's (no sweep.yaml, audit.yaml "
                          "or matrix.yaml); pass one written by pfedpg-eval train, privacy, audit or robustness")
    return _run(d, fmt)


def _run(d: Path, fmt: str) -> list[Path]:
    from evaluations.latex import run_table
    from evaluations.plots import learning_curve
    from evaluations.report import write_report

    if fmt == "html":
        raise ConfigError(f"a run's report is Markdown or LaTeX; pass --format markdown or --format latex for "
                          f"{str(d)!r} (--format html is for a grid's folder)")
    if fmt == "markdown":
        out = write_report(d)
        return [out, d / "learning_curve.png", d / "learning_curve.pdf"]
    if not (d / "summary.json").is_file():
        raise FileNotFoundError(f"{str(d / 'summary.json')!r} not found: the run has not finished; "
                                f"finish it first: pfedpg-eval train --resume --run-dir {d}")
    png = learning_curve(d)
    return [run_table(d), png.with_suffix(".pdf")]


def load_grid(d: Path, settings: str):
    """The grid object whose settings ``d/settings`` records (as the grid command built it)."""
    from evaluations.leakage_sweep import AuditGrid
    from evaluations.privacy import PrivacySweep, PrivacySweepConfig
    from evaluations.robustness import RobustnessConfig, RobustnessMatrix
    from pfedpg.typed import build_dataclass

    kind, section = SETTINGS[settings]
    record = yaml.safe_load((d / settings).read_text()) or {}
    if not isinstance(record, dict) or "base" not in record or section not in record:
        raise ConfigError(f"{str(d / settings)!r} is not the settings file a {kind} writes (base and {section}); "
                          f"rerun the {kind.split()[0]} command with --out {d}")
    values = dict(record[section])
    if section == "robustness":
        return RobustnessMatrix(build_dataclass(RobustnessConfig, values, section), record["base"])
    if section == "audit":
        probes = values.pop("probes", None) or {}
        return AuditGrid(build_dataclass(PrivacySweepConfig, values, section), record["base"], probes)
    return PrivacySweep(build_dataclass(PrivacySweepConfig, values, section), record["base"])


def read_rows(grid, d: Path):
    """Each cell's row and result, read from ``d/runs`` as :func:`evaluations.sweep.run_grid` reads
    a finished cell on a rerun (nothing is deleted, nothing runs)."""
    from evaluations.sweep import CellResult, _same_config
    from pfedpg.config import config_from_dict

    rows, results = [], []
    for cell in grid.cells():
        if cell.infeasible is not None:
            rows.append(grid.row(cell, None, None, None))
            continue
        run_dir = d / "runs" / cell.name
        summary, error = None, None
        try:
            cfg = config_from_dict(cell.config)
        except ConfigError as e:
            cfg, error = None, f"ConfigError: {e}"
        if cfg is not None and (run_dir / "config.yaml").is_file() and not _same_config(run_dir / "config.yaml", cfg):
            error = f"ConfigError: {run_dir} holds a run with a different config; delete it or choose another --out"
        elif cfg is not None and (run_dir / "summary.json").is_file():
            summary = json.loads((run_dir / "summary.json").read_text())
        elif cfg is not None and (run_dir / "diverged.json").is_file():
            error = json.loads((run_dir / "diverged.json").read_text())["error"]
        elif cfg is not None and (run_dir / "error.txt").is_file():
            error = last_error((run_dir / "error.txt").read_text())
        elif cfg is not None:
            what = "has no folder" if not run_dir.is_dir() else "has not finished (no summary.json)"
            raise ConfigError(f"cell {cell.name} of {str(d)!r} {what}: rerun the grid's command with --out {d} to "
                              "finish it (it writes every report file)")
        rows.append(grid.row(cell, run_dir, summary, error))
        results.append(CellResult(cell, run_dir, summary, error))
    return rows, results


def last_error(trace: str) -> str:
    """A failed cell's error as its row holds it (``ConfigError: ...``, the message's lines kept), from
    the traceback it left in error.txt: the last exception's line and the message lines after it."""
    lines = trace.rstrip("\n").splitlines()
    tb = max((i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")), default=None)
    if tb is None:  # error.txt holds the error alone
        return trace.strip()
    i = tb + 1
    while i < len(lines) and (not lines[i] or lines[i][0].isspace()):  # the frames, indented
        i += 1
    return re.sub(r"^(?:\w+\.)+(\w+: )", r"\1", "\n".join(lines[i:]))


def _grid(d: Path, settings: str, fmt: str) -> list[Path]:
    grid = load_grid(d, settings)
    rows, results = read_rows(grid, d)
    with tempfile.TemporaryDirectory(prefix="pfedpg-report-") as tmp:
        scratch = Path(tmp)
        grid.write_outputs(scratch, rows, results)
        written = []
        for pattern in PATTERNS[fmt]:
            for f in sorted(scratch.glob(pattern)):
                shutil.copyfile(f, d / f.name)
                written.append(d / f.name)
    return written
