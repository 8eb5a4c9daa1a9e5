"""``pfedpg-eval``: train, pretrain, privacy, audit, robustness, plan, report, compare and flower-certs, on click.

Every run subcommand takes ``--config FILE`` and repeatable ``--set key.sub=value`` overrides. The contract: bad input
ends with one line ``error: ...`` naming the fix and exit status 2; exit 1 only for a run or grid cell that failed;
Ctrl-C ends with the command that resumes (exit 130), SIGTERM the same way (exit 143). ``main(argv)`` returns the
exit status (the console script exits with it). Shell completion: ``eval "$(_PFEDPG_EVAL_COMPLETE=bash_source
pfedpg-eval)"`` (``zsh_source``, ``fish_source``)."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import click

from evaluations.compare_report import command as compare_command
from evaluations.flower.certs import command as flower_certs_command
from evaluations.paths import check_writable
from evaluations.plugins import load_plugins
from evaluations.ray_executor import executor_for
from evaluations.signals import Terminated, sigterm_as_interrupt
from pfedpg import jsonio
from pfedpg.deprecation import show_renamed_keys_as_one_line
from pfedpg.errors import ClientFailure, ConfigError, DataError, NonFiniteDeltaError

#: what every command prints its progress with (``--quiet`` silences it)
_OUT = SimpleNamespace(quiet=False, verbose=False)


def _log(msg: str) -> None:
    if not _OUT.quiet:
        print(msg, file=sys.stderr, flush=True)


def _failed(out: Path) -> int:
    """Exit status 1 for a grid with failed cells; with --quiet, which hides the cells' progress lines,
    their errors in one line (exit status alone would not say which cell failed, or why)."""
    from evaluations.sweep import failed_cells

    lines = failed_cells(out)
    if lines and _OUT.quiet:
        print(f"{len(lines)} cell(s) failed: {'; '.join(lines)} (rows of {out}'s table; rerunning the same "
              "command runs them again)", file=sys.stderr, flush=True)
    return 1 if lines else 0


def _run_dir(cfg) -> Path:
    return Path(cfg.output_dir) / (cfg.run_name or f"{cfg.method}-{cfg.data.source}-seed{cfg.seed}")


def cmd_train(args) -> int:
    from contextlib import nullcontext

    from evaluations.resume import in_start_directory, resumed_config
    from evaluations.tracking import train_tracked
    from pfedpg.config import load_config

    if args.resume and args.run_dir is None:
        raise ConfigError("--resume needs --run-dir RUN_DIR (the run to continue)")
    if args.resume:  # its own config (--set rounds=N aside), read where it started (evaluations/resume.py)
        cfg = resumed_config(Path(args.run_dir), args.config, args.overrides)
        place = in_start_directory(Path(args.run_dir), _log)
    else:
        cfg = load_config(args.config, args.overrides)
        place = nullcontext(Path(args.run_dir) if args.run_dir else _run_dir(cfg))
    with place as run_dir:
        check_writable(run_dir, "run directory")
        _OUT.resume_hint = lambda: train_resume_hint(run_dir)
        summary, report = train_tracked(cfg, run_dir, log=_log, progress=not args.no_progress and not _OUT.quiet,
                                        resume=args.resume, restart=args.restart)  # (tracked: config's tracking)
    acc = summary["accuracy"]
    print(f"{cfg.method}: adapted-prompt accuracy mean {100 * acc['mean']:.2f} %, worst {100 * acc['worst']:.2f} % "
          f"-> {report}" if acc
          else f"{cfg.method}: {summary.get('client_metrics')} -> {report}")
    return 0


def cmd_pretrain(args) -> int:
    from pfedpg.config import load_config
    from pfedpg.pretrain import pretrain_backbone

    cfg = load_config(args.config, args.overrides)
    if cfg.model.weights != "pretrain":
        raise ConfigError(f"pretrain needs model.weights=pretrain (it is {cfg.model.weights!r}); "
                          "add --set model.weights=pretrain")
    path = pretrain_backbone(cfg, log=_log, force=args.force, progress=not args.no_progress and not _OUT.quiet)
    print(path)
    return 0


def cmd_privacy(args) -> int:
    from evaluations.privacy import load_sweep, run_sweep

    sweep, base = load_sweep(args.config, args.overrides)
    check_writable(args.out or sweep.out_dir, "sweep directory")
    out = run_sweep(sweep, base, out_dir=args.out, jobs=args.jobs, executor=args.executor, log=_log)
    print((out / "tradeoff.md").read_text())
    print(f"report: {out / 'report.md'} (and report.html, tradeoff.csv, tradeoff.tex, accuracy_vs_epsilon.png/.pdf)")
    return _failed(out)


def cmd_audit(args) -> int:
    from evaluations.leakage_sweep import group_line, load_audit, run_audit

    grid, probes, base = load_audit(args.config, args.overrides)
    check_writable(args.out or grid.out_dir, "audit directory")
    out = run_audit(grid, probes, base, out_dir=args.out, jobs=args.jobs, executor=args.executor, log=_log)
    for group, res in jsonio.read(out / "audit.json")["groups"].items():
        print(group_line(group, res))
    plots = "".join(f", {f[:-4]}.png/.pdf" for f in ("roc_*.png", "tpr_vs_epsilon.png") if any(out.glob(f)))
    print(f"report: {out / 'report.md'} (and report.html, audit.json, audit.tex{plots})")
    return _failed(out)


def cmd_robustness(args) -> int:
    from evaluations.robustness import load_matrix, run_matrix

    matrix, base = load_matrix(args.config, args.overrides)
    check_writable(args.out or matrix.out_dir, "matrix directory")
    out = run_matrix(matrix, base, out_dir=args.out, jobs=args.jobs, executor=args.executor, log=_log)
    print((out / "robustness.md").read_text())
    print(f"report: {out / 'report.md'} (and report.html, robustness.csv, robustness.tex, heatmap.png/.pdf, "
          "worst_case.png/.pdf)")
    return _failed(out)


def cmd_report(args) -> int:
    from evaluations.regenerate import regenerate

    print("\n".join(map(str, regenerate(args.run_dir, args.format))))
    return 0


def cmd_plan(args) -> int:
    from evaluations.plan import plan, render

    if args.config is None:
        raise ConfigError("plan needs --config FILE (a run config, or a privacy, audit or robustness file)")
    p = plan(args.config, args.overrides, steps=args.steps, log=_log, jobs=args.jobs)
    print(json.dumps(p, indent=1) if args.json else render(p))
    return 0


# ------------------------------------------------------------------------------------------------
# The click commands: each gathers its options into the namespace the cmd_* functions read.

_CONFIG = click.option("--config", "-c", metavar="FILE", help="YAML config (see configs/); defaults apply when omitted")
_SET = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config value, e.g. "
                    "--set client.lr=1e-3 --set rounds=5 (repeatable; YAML 1.2 values)")
_ENGINE = click.option("--engine", type=click.Choice(["inprocess", "flower"]), help="run in this process (default) "
                       "or through Flower: its simulation engine, or the SuperLink at --set flower.superlink=HOST:PORT "
                       "(needs pip install '.[flower]'); same as --set engine=...")
_NO_PROGRESS = click.option("--no-progress", is_flag=True, help="no progress bars")


def _ns(**kw) -> SimpleNamespace:
    kw["overrides"] = list(kw.get("overrides") or [])
    if kw.get("engine"):
        kw["overrides"].append(f"engine={kw['engine']}")
    return SimpleNamespace(**kw)


def _version() -> str:
    from pfedpg import __version__

    return __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             commands=[compare_command, flower_certs_command])  # in their own modules
@click.version_option(_version(), "--version", "-V", prog_name="pfedpg-eval")
@click.option("--quiet", "-q", is_flag=True, help="print results and errors only (no progress, no log lines)")
@click.option("--verbose", "-v", is_flag=True, help="also show library warnings (e.g. Opacus') and full tracebacks")
def cli(quiet: bool, verbose: bool) -> None:
    """Privacy and robustness evaluation of pFedPG (Yang et al., ICCV 2023): client-specific prompt
    generation for a frozen ViT.

    \b
    Examples:
      pfedpg-eval train --config configs/quickstart.yaml
      pfedpg-eval privacy --config configs/privacy_demo.yaml --jobs 2
      pfedpg-eval audit --config configs/audit.yaml
      pfedpg-eval robustness --config configs/robustness.yaml --jobs 2
      pfedpg-eval plan --config configs/cifar10_dirichlet.yaml"""
    _OUT.quiet, _OUT.verbose = quiet, verbose
    if not verbose:  # library chatter (Opacus' secure-RNG notice, timm, Ray) is not ours to print
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    show_renamed_keys_as_one_line()  # an old config key or option name, even when quiet


@cli.command(epilog="Example: pfedpg-eval train --config configs/quickstart.yaml --set rounds=5 --run-dir runs/try")
@_CONFIG
@_SET
@_ENGINE
@click.option("--run-dir", metavar="DIR",
              help="run directory (default: output_dir/run_name, or OUTPUT_DIR/METHOD-SOURCE-seedSEED)")
@click.option("--resume", is_flag=True, help="continue the run in --run-dir from its latest checkpoint, with its own "
              "config (--set rounds=N continues it to N rounds), in the directory it started in")
@click.option("--restart", is_flag=True, help="start an unfinished run in the run directory again (its files are kept "
                                              "under RUN_DIR/attempt-<k>/)")
@_NO_PROGRESS
def train(**kw) -> int:
    """Train one run (pFedPG or a baseline: fedvpt, local).

    Writes config.yaml, metrics.jsonl, summary.json, learning_curve.png/.pdf, report.md and checkpoints
    into the run directory; with tracking.mlflow / tracking.tensorboard set, also logs to MLflow / TensorBoard."""
    if kw["resume"] and kw["restart"]:
        raise ConfigError("--resume and --restart contradict each other; pass one")
    return cmd_train(_ns(**kw))


@cli.command(short_help="Pretrain the backbone and cache it.",
             epilog="Example: pfedpg-eval pretrain --config configs/positive_control.yaml")
@_CONFIG
@_SET
@click.option("--force", is_flag=True, help="retrain even if the cache holds this backbone")
@_NO_PROGRESS
def pretrain(**kw) -> int:
    """Pretrain the backbone and cache it; prints the cached file's path.

    Supervised pretraining of the whole backbone on the data's public split (never given to clients), or on an external
    data set given as pretrain.data.path; cached under pretrain.cache_dir by config hash, with a per-epoch log and
    resumable state beside it (an interrupted pretraining continues where it stopped)."""
    _OUT.resume_hint = lambda: f"{_command_line()} (it continues from its last epoch checkpoint)"
    return cmd_pretrain(_ns(**kw))


def _grid_command(name: str, func, what: str, short: str, long: str, example: str):
    @cli.command(name, help=f"{short}.\n\n{long} --set {name}.KEY=VALUE (e.g. {name}.seeds=[0,1]) changes the grid, "
                 "any other --set the base run config; every cell is checked before the first runs.",
                 short_help=short, epilog=f"Example: {example}")
    @_CONFIG
    @_SET
    @_ENGINE
    @click.option("--out", metavar="DIR", help=f"{what} directory (default: {name}.out_dir)")
    @click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
                  help="run N cells at once in worker processes; a config with threads: null gets cores/N threads "
                       "per cell, so set threads for numbers independent of N")
    @click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                  help="where cells run: this machine (--jobs), or Ray tasks, each asking for its threads as CPUs "
                       "and a GPU of its own when its device is CUDA (pip install '.[ray]')")
    @click.option("--ray-address", metavar="HOST:PORT", help="the Ray cluster to use (`ray start --head` on one "
                  "machine, `ray start --address HOST:PORT` on the others); default: a local Ray instance")
    @click.option("--no-progress", is_flag=True, help="accepted for symmetry with train: a grid shows no progress "
                                                      "bars, one line per finished cell (-q silences those)")
    def command(**kw) -> int:
        _OUT.resume_hint = lambda: f"{_command_line()} (finished cells are reused)"
        kw["executor"] = executor_for(kw["executor"], kw.pop("ray_address"))
        return func(_ns(**kw))

    return command


_grid_command("privacy", cmd_privacy, "sweep", "Accuracy-privacy trade-off sweep (client-level DP, DP-SGD, baselines)",
              "Run the grid of a privacy sweep file (see configs/privacy.yaml): seeds x {non-private, local, "
              "clip-only} and mechanism x privacy level. Writes tradeoff.csv, tradeoff.md, tradeoff.tex (the same "
              "table, booktabs), accuracy_vs_epsilon.png and .pdf, report.md and report.html; rerunning the same "
              "command resumes, reusing finished runs. Exit status 1 if a cell failed (it is a row in the table).",
              "pfedpg-eval privacy --config configs/privacy_demo.yaml --jobs 2")
_grid_command("audit", cmd_audit, "audit",
              "Leakage audit: membership, attribute, source, linkability probes, empirical ε",
              "Run the grid of an audit file (see configs/audit.yaml): seeds x {non-private, clip-only} and mechanism "
              "x privacy level, each run with the leakage_audit hook (audit.probes). Writes audit.json (per group and "
              "probe: auc, tpr_at_1pct_fpr, tpr_at_0.1pct_fpr with bootstrap intervals that refit the threshold, "
              "n_targets, threat_model), audit.tex (the report's table, booktabs), roc_<group>.png and "
              "tpr_vs_epsilon.png (each also .pdf), report.md and report.html; rerunning "
              "resumes. audit.client_canaries / audit.gradient_canaries add the one-run audits "
              "(configs/audit_falsifiable.yaml): per group epsilon_lb, epsilon_cap, family, claimed_epsilon, can_fail, "
              "violation. Exit status 1 if a cell failed.",
              "pfedpg-eval audit --config configs/audit_positive_control.yaml --jobs 2")
_grid_command("robustness", cmd_robustness, "matrix", "Attacks x defenses x malicious fractions x seeds",
              "Run the matrix of a robustness file (see configs/robustness.yaml). Writes robustness.csv, "
              "robustness.md, robustness.tex (the same table, booktabs), heatmap.png and worst_case.png (each also "
              ".pdf), report.md and report.html; infeasible (rule, f) cells are rows, not crashes; a diverged cell is "
              "a result (the attack succeeded); rerunning resumes. Exit status 1 if a cell failed.",
              "pfedpg-eval robustness --config configs/robustness.yaml --jobs 2")


@cli.command(short_help="What a config will cost (memory, communication, time) before it runs.",
             epilog="Example: pfedpg-eval plan --config configs/cifar10_dirichlet.yaml --set client.batch_size=16")
@_CONFIG
@_SET
@click.option("--steps", type=click.IntRange(min=1), default=3, show_default=True, metavar="K",
              help="local steps to time (after one warm-up step)")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="the --jobs the grid will run with: steps are timed with a cell's threads there, plus the wall time")
@click.option("--json", "json", is_flag=True, help="print the plan as JSON")
def plan(**kw) -> int:
    """What a train, privacy, audit or robustness config will cost, without training.

    Expands the grid into its runs, partitions the data as they will (split sizes), builds one run for real on the
    chosen device (its uint8 records and the backbone with random weights: nothing is downloaded or pretrained) and
    times K real local steps and an evaluation batch. Prints the clients and records, the numbers each client sends per
    round, the measured resident (and GPU) memory, and the time per step extrapolated to every run of the grid."""
    return cmd_plan(_ns(**kw))


@cli.command(short_help="(Re)write the report of a finished run or grid, as Markdown, LaTeX or HTML.",
             epilog="Example: pfedpg-eval report runs/demo --format latex")
@click.argument("run_dir", metavar="DIR")
@click.option("--format", "fmt", type=click.Choice(["markdown", "latex", "html"]), default="markdown",
              show_default=True, help="markdown: report.md, the Markdown table and the PNG plots; latex: the LaTeX "
              "table (.tex) and the PDF plots; html: report.html (grids only)")
def report(run_dir: str, fmt: str) -> int:
    """(Re)write the report of a finished run (DIR holds summary.json) or grid (DIR holds the sweep.yaml,
    audit.yaml or matrix.yaml its command wrote), from what the folder holds: nothing is trained.
    A run: report.md and learning_curve.png/.pdf, or accuracy.tex. A grid: its rows are read back from
    DIR/runs as a rerun reads them; tradeoff.tex / audit.tex / robustness.tex and each plot's PDF, or
    its Markdown table, report.md and PNGs, or report.html."""
    return cmd_report(SimpleNamespace(run_dir=run_dir, format=fmt))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: sys.argv[1:]); returns the exit status."""
    _OUT.quiet = _OUT.verbose = False
    _OUT.resume_hint = None
    _OUT.argv = list(sys.argv[1:] if argv is None else argv)
    load_plugins()
    try:
        with sigterm_as_interrupt():  # a batch scheduler's SIGTERM stops like Ctrl-C
            code = cli.main(args=argv, prog_name="pfedpg-eval", standalone_mode=False)
        return int(code or 0)
    except click.exceptions.Exit as e:  # --help, --version
        return e.exit_code
    except click.UsageError as e:
        hint = f" (see pfedpg-eval {e.ctx.info_name + ' ' if e.ctx and e.ctx.parent else ''}--help)".replace("  ", " ")
        if isinstance(e, click.NoSuchOption) and e.option_name in ("-q", "--quiet", "-v", "--verbose"):
            hint = f" ({e.option_name} goes before the command: pfedpg-eval {e.option_name} COMMAND ...)"
        print(f"error: {e.format_message()}{hint}", file=sys.stderr)
        return 2
    except (click.Abort, KeyboardInterrupt) as e:  # Abort: click's word for Ctrl-C (and for SIGTERM: its cause)
        return _interrupted(143 if isinstance(e, Terminated) or isinstance(e.__cause__, Terminated) else 130)
    except (ConfigError, DataError, NonFiniteDeltaError, ClientFailure, FileNotFoundError, NotADirectoryError,
            IsADirectoryError, PermissionError) as e:
        _traceback_if_verbose()
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as e:  # out of memory outside a run's rounds (building it, a plan)
        from pfedpg.models.device import is_out_of_memory, out_of_memory_error

        kind = is_out_of_memory(e)
        if kind is None:
            raise
        _traceback_if_verbose()
        print("error: "
              f"{_one_line(out_of_memory_error(kind, 'the run device' if kind == 'device' else 'this machine', e))}",
              file=sys.stderr)
        return 2


def _traceback_if_verbose() -> None:
    if _OUT.verbose:
        import traceback

        traceback.print_exc()


def _one_line(e: BaseException) -> str:
    if isinstance(e, (NotADirectoryError, IsADirectoryError, PermissionError)) and getattr(e, "filename", None):
        what = {NotADirectoryError: "a file stands where a directory is needed",
                IsADirectoryError: "a directory stands where a file is needed",
                PermissionError: "no permission to write there"}[type(e)]
        return f"cannot write {e.filename}: {what}; choose another output directory (--out / --run-dir / output_dir)"
    return " ".join(str(e).split("\n"))


def train_resume_hint(run_dir: Path) -> str:
    """What an interrupted ``train`` says: --resume where a checkpoint exists, else the same command."""
    from pfedpg.run import latest_checkpoint

    if latest_checkpoint(run_dir) is not None:
        return f"pfedpg-eval train --resume --run-dir {run_dir}"
    return f"the same command (no checkpoint in {run_dir} yet: it starts the run again)"


def _command_line() -> str:
    """The command as it was given (what reruns an interrupted grid or pretraining)."""
    import shlex

    return shlex.join(["pfedpg-eval", *getattr(_OUT, "argv", [])])


def _interrupted(code: int) -> int:
    hint = _OUT.resume_hint() if callable(_OUT.resume_hint) else _OUT.resume_hint
    print("\ninterrupted" + (f"; resume with: {hint}" if hint else ""), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
