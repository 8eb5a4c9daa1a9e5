"""``pfedpg-eval``: train, pretrain, privacy, audit, robustness and report (DESIGN: typical commands).

Every subcommand takes ``--config FILE`` and repeatable ``--set key.sub=value`` overrides; bad
input ends with a one-line ``error: ...`` naming the fix and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from evaluations.plugins import load_plugins
from pfedpg.errors import ClientFailure, ConfigError, DataError, NonFiniteDeltaError


def _add_config_args(p: argparse.ArgumentParser, *, engine: bool = True) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config (see configs/); defaults apply when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set client.lr=0.1 --set rounds=5 (repeatable)")
    if not engine:
        return
    p.add_argument("--engine", choices=("inprocess", "flower"),
                   help="run in this process (default) or through Flower: its simulation engine, or the SuperLink "
                        "at --set flower.superlink=HOST:PORT (needs pip install '.[flower]'); same as --set engine=...")


def _positive_int(text: str) -> int:
    """argparse type: refuse --jobs 0 before anything is written."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def _run_dir(cfg) -> Path:
    name = cfg.run_name or f"{cfg.method}-{cfg.data.source}-seed{cfg.seed}"
    return Path(cfg.output_dir) / name


def cmd_train(args) -> int:
    from evaluations.report import write_report
    from pfedpg.config import load_config
    from evaluations.sweep import run_training

    if args.resume and args.run_dir is None:
        raise ConfigError("--resume needs --run-dir RUN_DIR (the run to continue)")
    if args.resume:
        run_dir = Path(args.run_dir)
        cfg = load_config(run_dir / "config.yaml", args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
        run_dir = Path(args.run_dir) if args.run_dir else _run_dir(cfg)
    summary = run_training(cfg, run_dir, log=lambda m: print(m, file=sys.stderr), progress=not args.no_progress,
                           resume=args.resume)
    report = write_report(run_dir)
    acc = summary["accuracy"]
    print(f"{cfg.method}: adapted-prompt accuracy mean {acc['mean']:.4f}, worst {acc['worst']:.4f} -> {report}")
    return 0


def cmd_pretrain(args) -> int:
    from pfedpg.config import load_config
    from pfedpg.pretrain import pretrain_backbone

    cfg = load_config(args.config, args.overrides)
    if cfg.model.weights != "pretrain":
        raise ConfigError(f"pretrain needs model.weights=pretrain (it is {cfg.model.weights!r}); add --set model.weights=pretrain")
    path = pretrain_backbone(cfg, log=lambda m: print(m, file=sys.stderr), force=args.force, progress=True)
    print(path)
    return 0


def cmd_privacy(args) -> int:
    from evaluations.privacy import load_sweep, run_sweep

    sweep, base = load_sweep(args.config, args.overrides)
    out = run_sweep(sweep, base, out_dir=args.out, jobs=args.jobs, log=lambda m: print(m, file=sys.stderr))
    print((out / "tradeoff.md").read_text())
    print(f"report: {out / 'report.md'} (and report.html, tradeoff.csv, accuracy_vs_epsilon.png)")
    return 1 if (out / "FAILED").exists() else 0


def cmd_audit(args) -> int:
    from evaluations.audit import load_audit, run_audit

    grid, probes, base = load_audit(args.config, args.overrides)
    out = run_audit(grid, probes, base, out_dir=args.out, jobs=args.jobs, log=lambda m: print(m, file=sys.stderr))
    summary = json.loads((out / "audit.json").read_text())
    for group, res in summary["groups"].items():
        cells = ", ".join(f"{p} {r['auc']:.3f}" for p, r in res["probes"].items() if "auc" in r)
        cc = res["probes"].get("client_canary")
        extra = f"; client-level ε̂ {cc['epsilon_hat']:.2f} [{cc['epsilon_ci'][0]:.2f}, {cc['epsilon_ci'][1]:.2f}]" if cc else ""
        print(f"{group}: AUC {cells}{extra}")
    print(f"report: {out / 'report.md'} (and report.html, audit.json, roc_*.png, tpr_vs_epsilon.png)")
    return 1 if (out / "FAILED").exists() else 0


def cmd_robustness(args) -> int:
    from evaluations.robustness import load_matrix, run_matrix

    matrix, base = load_matrix(args.config, args.overrides)
    out = run_matrix(matrix, base, out_dir=args.out, jobs=args.jobs, log=lambda m: print(m, file=sys.stderr))
    print((out / "robustness.md").read_text())
    print(f"report: {out / 'report.md'} (and report.html, robustness.csv, heatmap.png, worst_case.png)")
    rows = (out / "robustness.csv").read_text()
    return 1 if ",failed," in rows else 0


def cmd_report(args) -> int:
    from evaluations.report import write_report

    print(write_report(args.run_dir))
    return 0


def cmd_flower_certs(args) -> int:
    from evaluations.flower_certs import make_certificates

    files = make_certificates(args.out_dir, hosts=args.host or ["127.0.0.1", "localhost"], nodes=args.nodes, days=args.days)
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pfedpg-eval",
        description="Privacy and robustness evaluation of pFedPG (Yang et al., ICCV 2023): "
                    "client-specific prompt generation for a frozen ViT.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="run pFedPG or a baseline (fedvpt, local) into a run directory",
                       description="Train one run and write config.yaml, metrics.jsonl, summary.json, "
                                   "learning_curve.png, report.md and checkpoints into the run directory "
                                   "(default: OUTPUT_DIR/METHOD-SOURCE-seedSEED).")
    _add_config_args(p)
    p.add_argument("--run-dir", metavar="DIR", help="run directory (overrides output_dir/run_name)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain", help="pretrain the backbone (public split or pretrain.data) and cache it",
                       description="Supervised pretraining of the whole backbone on the data's public split "
                                   "(never given to clients), or on an external data set given as "
                                   "pretrain.data.path; cached under pretrain.cache_dir by config hash, with a "
                                   "per-epoch log and resumable state beside it (an interrupted pretraining "
                                   "continues where it stopped). Prints the cached file's path.")
    _add_config_args(p, engine=False)
    p.add_argument("--force", action="store_true", help="retrain even if the cache holds this backbone")
    p.set_defaults(func=cmd_pretrain)

    grids = [
        ("privacy", cmd_privacy, "sweep", "accuracy-privacy trade-off sweep (client-level DP, DP-SGD, baselines)",
         "Run the grid of a privacy sweep file (see configs/privacy.yaml): seeds x {non-private, local, clip-only} "
         "and mechanism x privacy level. Writes tradeoff.csv, tradeoff.md, accuracy_vs_epsilon.png, report.md and "
         "report.html; rerunning the same command resumes, reusing finished runs. --set overrides the base run "
         "config. Exit status 1 if a cell failed (it is a row in the table)."),
        ("audit", cmd_audit, "audit", "leakage audit: membership, attribute, source, linkability probes and empirical ε",
         "Run the grid of an audit file (see configs/audit.yaml): seeds x {non-private, clip-only} and mechanism x "
         "privacy level, each run with the leakage_audit hook (audit.probes). Writes audit.json (per group and probe: "
         "auc, tpr_at_1pct_fpr, tpr_at_0.1pct_fpr with Clopper-Pearson intervals, n_targets, threat_model), "
         "roc_<group>.png, tpr_vs_epsilon.png, report.md and report.html; rerunning resumes. Exit status 1 if a "
         "cell failed."),
        ("robustness", cmd_robustness, "matrix", "attacks x defenses x malicious fractions x seeds",
         "Run the matrix of a robustness file (see configs/robustness.yaml). Writes robustness.csv, robustness.md, "
         "heatmap.png, worst_case.png, report.md and report.html; infeasible (rule, f) cells are rows, not crashes; "
         "rerunning resumes. --set overrides the base run config. Exit status 1 if a cell failed."),
    ]
    for name, func, what, short, long in grids:
        p = sub.add_parser(name, help=short, description=long)
        _add_config_args(p)
        p.add_argument("--out", metavar="DIR", help=f"{what} directory (default: {name}.out_dir)")
        p.add_argument("--jobs", "-j", type=_positive_int, default=1, metavar="N",
                       help="run N cells at once in worker processes (default 1); a config with threads: null "
                            "gets cores/N threads per cell, so set threads for numbers independent of N")
        p.set_defaults(func=func)

    p = sub.add_parser("flower-certs", help="make a CA, a SuperLink certificate and SuperNode keys for a TLS deployment",
                       description="Write ca.crt/ca.key, server.pem/server.key (the SuperLink's certificate for every "
                                   "--host) and node<i>.key/node<i>.pub (SuperNode authentication keys, OpenSSH EC "
                                   "P-384) into OUT_DIR. See the README's 'Deployment with TLS'.")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--host", action="append", metavar="NAME",
                   help="a name or IP address the SuperNodes dial (repeatable; default 127.0.0.1 and localhost)")
    p.add_argument("--nodes", type=int, default=0, metavar="N", help="SuperNode key pairs to make (default 0)")
    p.add_argument("--days", type=_positive_int, default=365, metavar="D", help="validity in days (default 365)")
    p.set_defaults(func=cmd_flower_certs)

    p = sub.add_parser("report", help="(re)write report.md and the plots of a finished run",
                       description="Write report.md and learning_curve.png for RUN_DIR from its summary.json and metrics.jsonl.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    if getattr(args, "engine", None):
        args.overrides.append(f"engine={args.engine}")
    load_plugins()
    try:
        return args.func(args)
    except (ConfigError, DataError, NonFiniteDeltaError, ClientFailure, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
