"""``pfedpg-eval compare A B``: two run folders, or two grid folders of one kind, side by side.

What differs between A and B is said first: every config key whose value differs (for grids, the
base run config's keys as ``base.KEY`` and the grid section's as ``privacy.KEY``, ``audit.KEY`` or
``robustness.KEY``). Where a run is written or logged (``output_dir``, ``run_name``, ``tracking``,
``flower`` between two in-process runs, a grid's ``out_dir``) decides none of its numbers and does
not count.

**Two runs** (folders holding ``summary.json``): mean and worst accuracy of the adapted and the
generated prompt, ε of each DP mechanism (in its own privacy unit), the bytes a client sends and
receives per round, and B − A per client — clients paired by id, only where both runs hold the same
clients (the same data config and seed, so the same partition; the same client names and test
splits), else the comparison says why not — with its mean and 95% t-interval over clients.

**Two grids** (folders holding ``sweep.yaml``, ``audit.yaml`` or ``matrix.yaml`` and ``runs/``):
cells are paired by name, which is the setting and ``-s<seed>`` (``dp_client-z1-s0``,
``sign_flip-median-frac0.25-s1``); per setting both hold, B − A of the grid's headline metrics over
the seeds both hold — the privacy sweep's and the audit's accuracy, generated-prompt accuracy and
each probe's per-seed AUC (the audit also shows each group's pooled AUC, which cannot be paired);
the matrix's benign accuracy and attack success rate — with n, the mean, the 95% t-interval and a
verdict in words (`evaluations.stats.verdict`: from at least three paired seeds, *B higher* or
*B lower* only when the interval excludes zero). A diverged cell is a result and is paired (its
accuracy as measured when it diverged; the row says so); failed, infeasible and withheld cells, and
cells only one side holds, are listed, never dropped silently. Values are read from the grid's own
table (``tradeoff.csv``, ``robustness.csv``, ``audit.json``), the numbers its report shows.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import yaml

from evaluations.compare_results import Comparison, ConfigChange, Difference, PairedRow, SideBySide, Unpaired
from pfedpg import jsonio
from pfedpg.errors import ConfigError

#: a grid's settings file -> (its kind, its section, the table compare reads)
GRIDS = {"sweep.yaml": ("privacy sweep", "privacy", "tradeoff.csv"), "audit.yaml": ("audit", "audit", "audit.json"),
         "matrix.yaml": ("robustness matrix", "robustness", "robustness.csv")}
#: per grid section: (metric, column, unit); unit "fraction" reads in percent on the terminal, "auc" as is
METRICS = {"privacy": [("accuracy", "accuracy_mean", "fraction"),
                       ("generated accuracy", "accuracy_generated_mean", "fraction")],
           "robustness": [("benign accuracy", "benign_accuracy_mean", "fraction"), ("ASR", "asr", "fraction")]}
METRICS["audit"] = METRICS["privacy"]
#: config keys that decide no number: where a run is written or logged
NOT_COUNTED = ("output_dir", "run_name", "tracking")
#: the cell statuses that are results (a divergence is: the attack or the mechanism broke training)
RESULTS = ("ok", "diverged")
#: a difference this small is floating-point rounding (one mean summed in another order), not a change
ROUNDING = 1e-12
#: env.json entries that can change a run's numbers (same config and seed give the same numbers only there)
ENV_KEYS = ("pfedpg_eval", "torch", "numpy", "opacus", "torch_threads", "device")


def compare(a: str | Path, b: str | Path) -> Comparison:
    """Compare two run folders or two grid folders of one kind (see the module docstring)."""
    da, db = Path(a), Path(b)
    ka, kb = kind_of(da, "A"), kind_of(db, "B")
    if ka != kb:
        hint = ("compare two runs (a grid's runs are its runs/CELL folders) or two grids"
                if "run" in (ka, kb) else "compare two grids of one kind")
        raise ConfigError(f"A ({da}) is {_a(ka)} and B ({db}) {_a(kb)}; {hint}")
    if ka == "run":
        return _runs(da, db)
    return _grids(da, db, next(s for s, (k, _, _) in GRIDS.items() if k == ka))


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def kind_of(d: Path, side: str) -> str:
    """``run`` or a grid's kind; a ConfigError naming the fix for anything else."""
    if not d.exists():
        raise ConfigError(f"{side}: no such folder {str(d)!r}; pass a run's folder (summary.json) or a grid's "
                          "(sweep.yaml, audit.yaml or matrix.yaml with runs/)")
    if not d.is_dir():
        raise ConfigError(f"{side}: {str(d)!r} is a file; pass the run or grid folder that holds it")
    grid = next((GRIDS[f][0] for f in GRIDS if (d / f).is_file()), None)
    if grid is not None and (d / "runs").is_dir() and not (d / "summary.json").is_file():
        return grid
    if (d / "summary.json").is_file():
        return "run"
    if (d / "diverged.json").is_file():
        raise ConfigError(f"{side}: the run in {str(d)!r} diverged (diverged.json) and has no summary.json to "
                          "compare; compare the grids that hold it, where a divergence is a result")
    if (d / "config.yaml").is_file():
        raise ConfigError(f"{side}: the run in {str(d)!r} has not finished (no summary.json); finish it with "
                          f"pfedpg-eval train --resume --run-dir {d}")
    raise ConfigError(f"{side}: {str(d)!r} is neither a run folder (summary.json) nor a grid folder (sweep.yaml, "
                      "audit.yaml or matrix.yaml with runs/); pass one written by pfedpg-eval train, privacy, audit "
                      "or robustness")


# ------------------------------------------------------------------------------------------------
# What differs


def differences(a: Any, b: Any, key: str = "") -> list[ConfigChange]:
    """Every key path where two YAML trees differ (``pfedpg.typed.first_difference``, all of them)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in [*a, *(k for k in b if k not in a)]:
            sub = f"{key}.{k}" if key else str(k)
            if k not in a or k not in b:
                out.append(ConfigChange(sub, a.get(k, "(absent)"), b.get(k, "(absent)")))
            else:
                out += differences(a[k], b[k], sub)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [c for i, (x, y) in enumerate(zip(a, b)) for c in differences(x, y, f"{key}[{i}]")]
    return [] if a == b else [ConfigChange(key, a, b)]


def _resolved(tree: dict[str, Any], where: Path) -> dict[str, Any]:
    """A run config's YAML tree with every default filled in, as the toolkit saves it."""
    from pfedpg.config import dump_config, saved_config

    try:  # (saved_config: a run saved before a key was renamed reads under today's names, without warnings)
        return yaml.safe_load(dump_config(saved_config(yaml.safe_dump(tree))))
    except ConfigError as e:
        raise ConfigError(f"the config in {where} does not load ({' '.join(str(e).split())}); "
                          "was it written by another version of pfedpg-eval?") from None


def _config_changes(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[ConfigChange]:
    ignore = NOT_COUNTED + (("flower",) if a.get("engine") == b.get("engine") == "inprocess" else ())
    a, b = ({k: v for k, v in t.items() if k not in ignore} for t in (a, b))
    return [ConfigChange(prefix + c.key, c.a, c.b) for c in differences(a, b)]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} does not hold a mapping; is it a file pfedpg-eval wrote?")
    return tree


# ------------------------------------------------------------------------------------------------
# Two runs


def _runs(da: Path, db: Path) -> Comparison:
    sa, sb = jsonio.read(da / "summary.json"), jsonio.read(db / "summary.json")
    ca, cb = (_resolved(_read_yaml(d / "config.yaml"), d / "config.yaml") if (d / "config.yaml").is_file() else None
              for d in (da, db))
    notes = []
    if ca is None or cb is None:
        notes.append(f"no config.yaml in {da if ca is None else db}: what differs in the config is unknown")
    changes = _config_changes(ca, cb) if ca is not None and cb is not None else []
    side = []
    for block, word in (("accuracy", "adapted"), ("accuracy_generated", "generated")):
        for stat in ("mean", "worst"):
            side.append(SideBySide(f"{word} accuracy {stat}", "fraction", *((s.get(block) or {}).get(stat)
                                                                             for s in (sa, sb))))
    from evaluations.results import privacy_levels

    la, lb = ({p.mechanism: p for p in privacy_levels(s.get("hook_results"))} for s in (sa, sb))
    for mech in [*la, *(m for m in lb if m not in la)]:
        unit = (la.get(mech) or lb.get(mech)).privacy_unit
        side.append(SideBySide(f"ε {mech} ({unit})", "epsilon", *(lv[mech].epsilon_max if mech in lv else None
                                                                  for lv in (la, lb))))
    for key, word in (("up_bytes_per_client_round", "up"), ("down_bytes_per_client_round", "down")):
        side.append(SideBySide(f"{word} bytes per client per round", "bytes",
                               *((s.get("communication") or {}).get(key) for s in (sa, sb))))
    side.append(SideBySide("test records", "count", *(sum((s.get("data") or {}).get("test_per_client") or []) or None
                                                       for s in (sa, sb))))
    why = _why_not_paired(sa, sb, ca, cb)
    rows = []
    if why:
        notes.append(f"clients not paired: {why}")
    else:
        for block, metric in (("accuracy", "accuracy"), ("accuracy_generated", "generated accuracy")):
            pa, pb = ((s.get(block) or {}).get("per_client") for s in (sa, sb))
            if pa and pb:
                rows.append(_paired_row("clients", metric, "fraction", dict(enumerate(pa)), dict(enumerate(pb)),
                                        units="clients"))
    notes += _env_notes(da, db) + _same_folder(da, db)
    return Comparison(kind="run", a=da, b=db, changes=tuple(changes), side_by_side=tuple(side), rows=tuple(rows),
                      notes=tuple(notes))


def _why_not_paired(sa, sb, ca, cb) -> str | None:
    """Why the two runs' clients cannot be paired by id (None: they are the same clients)."""
    if not (sa.get("accuracy") and sb.get("accuracy")):
        return "a run's clients kept their accuracies (no per-client accuracy in its summary.json)"
    if ca is None or cb is None:
        return "a config.yaml is missing, so the partitions cannot be checked equal"
    if ca.get("seed") != cb.get("seed"):
        return (f"the seeds differ ({ca.get('seed')} vs {cb.get('seed')}), so the partitions (and each client's "
                "records) differ; pair runs of one seed, or compare the grids that hold several")
    data = [c.key for c in differences(ca.get("data"), cb.get("data"), "data")]
    if data:
        return f"the data configs differ ({', '.join(data)}), so client n is not the same client in both"
    for key in ("client_names", "test_per_client", "train_per_client"):
        if (sa.get("data") or {}).get(key) != (sb.get("data") or {}).get(key):
            return f"the runs' {key.replace('_', ' ')} differ"
    if sa.get("evaluated_on") != sb.get("evaluated_on"):
        return f"A was evaluated on {sa.get('evaluated_on')}, B on {sb.get('evaluated_on')}"
    return None


def _env_notes(da: Path, db: Path) -> list[str]:
    if not ((da / "env.json").is_file() and (db / "env.json").is_file()):
        return []
    ea, eb = jsonio.read(da / "env.json"), jsonio.read(db / "env.json")
    diff = [f"{k} {ea.get(k)} → {eb.get(k)}" for k in ENV_KEYS if ea.get(k) != eb.get(k)]
    commit = [(e.get("git") or {}).get("commit") for e in (ea, eb)]
    if commit[0] != commit[1]:
        diff.append(f"git commit {str(commit[0])[:10]} → {str(commit[1])[:10]}")
    return [f"environments differ ({'; '.join(diff)}): same config and seed give the same numbers only on the same "
            "code, libraries and thread count"] if diff else []


def _paired_row(setting: str, metric: str, unit: str, a: dict[int, float], b: dict[int, float], *,
                units: str = "seeds", note: str = "", **extra) -> PairedRow:
    from evaluations.stats import paired, verdict

    p = paired(b, a)  # B − A over the units both hold
    diff = None if p is None else Difference(tuple(p["seeds"]), tuple(p["diffs"]), p["mean"], p["std"],
                                             tuple(p["ci"]) if p["ci"] else None)
    if diff is None:
        words = f"nothing paired (no {units[:-1]} measured on both sides)"
    elif all(abs(v) <= ROUNDING for v in diff.values):
        words = "identical"
    else:
        words = verdict(p, below="B lower", above="B higher", level="level (interval holds 0)").replace("seeds", units)
    keys = diff.paired if diff else ()
    ma, mb = (sum(d[k] for k in keys) / len(keys) if keys else None for d in (a, b))
    return PairedRow(setting, metric, unit, ma, mb, diff, words, note, **extra)


# ------------------------------------------------------------------------------------------------
# Two grids


def _grids(da: Path, db: Path, settings: str) -> Comparison:
    kind, section, table = GRIDS[settings]
    for side, d in (("A", da), ("B", db)):
        record = _read_yaml(d / settings)
        if "base" not in record or section not in record:
            raise ConfigError(f"{side}: {d / settings} is not the settings file a {kind} writes (base and {section}); "
                              f"rerun the {kind.split()[0]} command with --out {d}")
    ra, rb = _read_yaml(da / settings), _read_yaml(db / settings)
    changes = _config_changes(_resolved(ra["base"], da / settings), _resolved(rb["base"], db / settings), "base.")
    sec = [{k: v for k, v in r[section].items() if k != "out_dir"} for r in (ra, rb)]
    changes += [ConfigChange(f"{section}.{c.key}", c.a, c.b) for c in differences(*sec)]
    rows_a, rows_b = _grid_rows(da, table, kind, "A"), _grid_rows(db, table, kind, "B")
    pooled_a, pooled_b = (_pooled(d) if section == "audit" else {} for d in (da, db))
    setting = {}  # cell -> (setting, seed)
    for rows in (rows_a, rows_b):
        for name, r in rows.items():
            setting[name] = (name.rsplit("-s", 1)[0], int(float(r["seed"])))
    unpaired = [Unpaired(c, _status(rows_a.get(c)), _status(rows_b.get(c)), _error(rows_a.get(c), rows_b.get(c)))
                for c in [*rows_a, *(c for c in rows_b if c not in rows_a)]
                if c not in rows_a or c not in rows_b or not (_status(rows_a[c]) in RESULTS
                                                               and _status(rows_b[c]) in RESULTS)]
    left_out = {u.cell for u in unpaired}
    metrics = list(METRICS[section]) + [(f"{c[:-4]} AUC", c, "auc") for c in _auc_columns(rows_a, rows_b)]
    out = []
    for s in dict.fromkeys(setting[c][0] for c in [*rows_a, *rows_b]):
        cells = [c for c in rows_a if setting[c][0] == s and c in rows_b and c not in left_out]
        if not cells:
            continue
        diverged = [f"{side} {c}" for c in cells for side, rows in (("A", rows_a), ("B", rows_b))
                    if _status(rows[c]) == "diverged"]
        note = f"diverged (accuracy as measured then): {', '.join(diverged)}" if diverged else ""
        for metric, col, unit in metrics:
            va, vb = ({setting[c][1]: v for c in cells if (v := _num(rows[c].get(col))) is not None}
                      for rows in (rows_a, rows_b))
            if not va and not vb:
                continue
            only = sorted(set(va) ^ set(vb))
            extra_note = f"; {metric} measured on one side only for seed(s) {only}" if only else ""
            eps = {}
            if section != "robustness":
                for side, rows in (("epsilon_a", rows_a), ("epsilon_b", rows_b)):
                    e = [x for c in cells if (x := _num(rows[c].get("epsilon_max"))) is not None]
                    eps[side] = max(e) if e else None
            if unit == "auc":
                probe = col[:-4]
                eps.update(pooled_a=pooled_a.get(s, {}).get(probe), pooled_b=pooled_b.get(s, {}).get(probe))
            out.append(_paired_row(s, metric, unit, va, vb, note=(note + extra_note).lstrip("; "), **eps))
    return Comparison(kind=kind, a=da, b=db, changes=tuple(changes), rows=tuple(out), unpaired=tuple(unpaired),
                      notes=tuple(_same_folder(da, db)))


def _same_folder(da: Path, db: Path) -> list[str]:
    return [f"A and B are the same folder ({da.resolve()})"] if da.resolve() == db.resolve() else []


def _grid_rows(d: Path, table: str, kind: str, side: str) -> dict[str, dict[str, Any]]:
    """Each cell's row of the grid's own table, by cell name."""
    path = d / table
    if not path.is_file():
        raise ConfigError(f"{side}: {d} holds no {table}: the {kind} has not finished; rerun its command with "
                          f"--out {d} (finished cells are reused)")
    if table.endswith(".json"):
        rows = jsonio.read(path).get("cells") or []
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    return {r["cell"]: r for r in rows}


def _pooled(d: Path) -> dict[str, dict[str, tuple]]:
    """The audit's pooled AUC per group and probe, with its interval."""
    out = {}
    for g, res in (jsonio.read(d / "audit.json").get("groups") or {}).items():
        for probe, r in (res.get("probes") or {}).items():
            if isinstance(r.get("auc"), (int, float)):
                lo, hi = r.get("auc_interval") or (None, None)
                out.setdefault(g, {})[probe] = (r["auc"], lo, hi)
    return out


def _auc_columns(*tables: dict[str, dict[str, Any]]) -> list[str]:
    """The probes' per-cell AUC columns (``loss_auc``; a canary view's ``canary_loss_auc``), in first-seen order."""
    cols = [k for t in tables for r in t.values() for k in r if k.endswith("_auc")]
    return list(dict.fromkeys(cols))


def _status(row: dict[str, Any] | None) -> str | None:
    return None if row is None else str(row.get("status") or "failed")


def _error(*rows: dict[str, Any] | None) -> str | None:
    errs = [str(r["error"]).strip().splitlines()[0] for r in rows
            if r is not None and r.get("error") and _status(r) not in RESULTS]
    return errs[0] if errs else None


def _num(v: Any) -> float | None:
    """A table cell as a number (CSV text, JSON value; ``inf`` kept, empty and NaN as None)."""
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x
