"""A readable ``report.md`` for one run directory (``pfedpg-eval report RUN_DIR``)."""
from __future__ import annotations

import html
import json
from pathlib import Path

import yaml

from evaluations.plots import learning_curve
from pfedpg import jsonio


def img_tag(path: str | Path, alt: str) -> str:
    """An <img> with the PNG embedded (base64), so the HTML report is one self-contained file."""
    import base64

    p = Path(path)
    if not p.is_file():
        return f"<p><i>({html.escape(alt)}: no plot was written)</i></p>"
    data = base64.b64encode(p.read_bytes()).decode("ascii")
    return f"<img src='data:image/png;base64,{data}' alt='{html.escape(alt)}' style='max-width:100%'>"


def write_grid_markdown(path: Path, md: list[str], rows: list[dict]) -> str:
    """A grid's report.md: ``md`` (title, blank, intro, ...) with the header line of what ran after
    the title and, at the end, one line per cell with its status (and error) and folder. Returns the
    intro paragraph (the HTML page repeats it)."""
    intro = md[2]
    md = (md[:1] + ["", run_header(rows)] + md[1:]
          + ["## Runs", "", "| cell | status | run directory |", "|---|---|---|"])
    md += [f"| {r['cell']} | {r['status']}{' — ' + r['error'] if r.get('error') else ''} | `{r['run_dir']}` |"
           for r in rows]
    path.write_text("\n".join(md) + "\n")
    return intro


def run_header(rows: list[dict]) -> str:
    """One line saying what a grid ran: method, data, clients, rounds, seeds, backbone, version —
    read from its runs' saved configs (the header a reader of a pasted report needs)."""
    from pfedpg import __version__

    cfgs = []
    for r in rows:
        f = Path(str(r.get("run_dir") or "")) / "config.yaml"
        if f.is_file():
            cfgs.append(yaml.safe_load(f.read_text()))
    if not cfgs:
        return f"pfedpg-eval {__version__}; no run finished."
    c = cfgs[0]
    d, m = c.get("data", {}), c.get("model", {})
    seeds = sorted({int(x["seed"]) for x in cfgs})
    kw = m.get("kwargs") or {}
    arch = ", ".join(f"{k} {kw[k]}" for k in ("img_size", "patch_size", "embed_dim", "depth") if k in kw)
    data = d.get("source", "?") + (f" ({Path(str(d['path'])).name})" if d.get("path") else "")
    clients = (f"{d.get('clients_per_domain')} per domain" if d.get("partition") == "domain"
               else f"{d.get('num_clients')} clients")
    gen = (c.get("server") or {}).get("generator")
    return (f"What was run: method {c.get('method')}"
            + (f" (generator {gen})" if c.get("method") == "pfedpg" and gen else "")
            + f"; data {data}, partition {d.get('partition')}, {clients}, {d.get('image_size')} px; "
            f"{c.get('rounds')} rounds, E = {(c.get('client') or {}).get('local_epochs')}; "
            f"seeds {', '.join(map(str, seeds))} (n = {len(seeds)}); backbone {m.get('name')} ({m.get('weights')}"
            + (f"; {arch}" if arch else "") + f"), {m.get('num_prompts')} prompt tokens "
            f"{m.get('prompt_depth', 'shallow')}; pfedpg-eval {__version__}.")


def html_page(title: str, heading: str, intro: str, header: list[str], body: list[list[str]], *,
              width: str = "75em", extra_css: str = "", meta: str | None = None) -> list[str]:
    """The opening of a sweep's self-contained HTML report: title, heading, what was run, intro
    and its table (escaped); callers append images (``img_tag``) and sections and join with newlines."""
    esc = html.escape
    return [f"<!doctype html><meta charset='utf-8'><title>{esc(title)}</title>",
            f"<style>body{{font-family:sans-serif;max-width:{width};margin:2em auto}}table{{border-collapse:collapse}}"
            f"td,th{{border:1px solid #ccc;padding:.3em .6em{extra_css}}}</style>",
            f"<h1>{esc(heading)}</h1>", *([f"<p><b>{esc(meta)}</b></p>"] if meta else []),
            f"<p>{esc(intro.replace('`', ''))}</p>",
            "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in body) + "</table>"]


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def write_report(run_dir: str | Path) -> Path:
    """``report.md`` of one finished run: its setting, accuracy (per client, new clients), the
    learning curve, communication, time and hook results."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{str(summary_path)!r} not found: the run has not finished; "
                                f"finish it first: pfedpg-eval train --resume --run-dir {run_dir}")
    s = jsonio.read(summary_path)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    png = learning_curve(run_dir)
    lines = _run_header(run_dir, s, cfg) + _accuracy_tables(s)
    if (s.get("new_clients") or {}).get("accuracy"):
        lines += _new_clients_section(s["new_clients"])
    lines += _communication_time_hooks(s, png)
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out


def _run_header(run_dir: Path, s: dict, cfg: dict) -> list[str]:
    comm = s["communication"]
    backbone_file = (s.get("backbone") or {}).get("file")
    return [
        f"# pFedPG-eval run: {run_dir.name}",
        "",
        f"Method **{s['method']}**" + (f" (generator `{s['generator']}`)" if s.get("generator") else "")
        + f", seed {s['seed']}, {s['rounds']} rounds, {s['num_clients']} clients ({s['clients_per_round']} per round).",
        f"Data `{s['data']['source']}`, partition `{s['data']['partition']}`; backbone `{cfg['model']['name']}` "
        f"({cfg['model']['weights']}{', file `' + str(backbone_file) + '`' if backbone_file else ''}, "
        f"{comm['backbone_numbers']:,} numbers, frozen), K = {cfg['model']['num_prompts']} prompts"
        + (" per layer (deep)." if cfg['model'].get('prompt_depth') == "deep" else " (shallow)."),
        "",
        "## Accuracy after the last round",
        "",
    ]


def _accuracy_tables(s: dict) -> list[str]:
    """The mean/worst/best table and the per-client table (or why the server does not know them)."""
    acc, gen = s["accuracy"], s.get("accuracy_generated")
    if acc is None:  # a deployment under a DP mechanism: the clients kept them (DESIGN §5)
        lines = [f"Not known to the server: {s.get('client_metrics')}. Each client's rows are in its own metrics "
                 "file (the node's metrics-dir).", ""]
    else:
        lines = [
            "Per-client top-1 accuracy on each client's own "
            f"{'validation' if s.get('evaluated_on') == 'val' else 'test'} "
            "split; the last round, never the best one." + (f" Client metrics: {s['client_metrics']}."
                                                          if s.get("client_metrics") else ""),
            "",
            "| prompt | mean | worst | best | std |",
            "|---|---|---|---|---|",
            f"| adapted P̃_n + head H_n | {_pct(acc['mean'])} | {_pct(acc['worst'])} | {_pct(acc['best'])} | "
            f"{_pct(acc['std'])} |",
        ]
    if gen:
        lines.append(f"| generated P_n + head H_n | {_pct(gen['mean'])} | {_pct(gen['worst'])} | {_pct(gen['best'])} | "
                     f"{_pct(gen['std'])} |")
    pids = s["data"].get("partition_ids")  # with new clients, training clients are renumbered
    lines += ["", "| client |" + (" partition id |" if pids else "") + " who | train | test | adapted | generated |",
              "|---|" + ("---|" if pids else "") + "---|---|---|---|---|"]
    per_client = acc["per_client"] if acc else [None] * s["num_clients"]
    names = s["data"].get("client_names") or [""] * len(per_client)
    for n, a in enumerate(per_client):
        g = gen["per_client"][n] if gen else None
        lines.append(f"| {n} |" + (f" {pids[n]} |" if pids else "")
                     + f" {names[n]} | {s['data']['train_per_client'][n]} | "
                     f"{s['data']['test_per_client'][n]} | {_pct(a)} | {_pct(g)} |")
    return lines


def _new_clients_section(new: dict) -> list[str]:
    na, ng = new["accuracy"], new.get("accuracy_generated")
    k = len(new["clients"])
    ncomm = new.get("communication") or {}
    lines = ["", "## New clients", "",
             f"{k} client{'s' if k != 1 else ''} held out of training (partition ids {new['partition_ids']}) "
             f"joined after the last round. They start from {new['start']}. Join round 0 is {new['round_0']}; "
             f"each method spends the same (R + 1)·E = {new['budget_epochs']} local "
             f"epoch{'s' if new['budget_epochs'] != 1 else ''}. Test records "
             f"per new client: {', '.join(map(str, new['test_per_client']))}."
             + (f" Each exchanges {ncomm['down_numbers_per_client']:,} numbers down and "
                f"{ncomm['up_numbers_per_client']:,} up over its join rounds." if ncomm else ""), "",
             "Accuracy % of each new client's adapted prompt and head on its own test split, "
             "after each join round:", "",
             "| join round | mean | worst |" + (" generated prompt + head (mean) |" if ng else ""),
             "|---|---|---|" + ("---|" if ng else "")]
    for j in range(new["join_rounds"] + 1):
        lines.append(f"| {j} | {_pct(na['mean'][j])} | {_pct(na['worst'][j])} |"
                     + (f" {_pct(ng['mean'][j])} |" if ng else ""))
    lines += ["", "| new client | partition id | who | train | round 0 | last join round |",
              "|---|---|---|---|---|---|"]
    for i, n in enumerate(new["clients"]):
        per = na["per_client"][i]
        lines.append(f"| {n} | {new['partition_ids'][i]} | {new['names'][i]} | {new['train_per_client'][i]} | "
                     f"{_pct(per[0])} | {_pct(per[-1])} |")
    if new.get("errors"):
        lines += ["", "Join rounds stopped early: " + "; ".join(new["errors"]) + "."]
    return lines


def _communication_time_hooks(s: dict, png: Path) -> list[str]:
    comm = s["communication"]
    lines = [
        "",
        f"![learning curve]({png.name})",
        "",
        "## Communication",
        "",
        f"Per participating client per round: {comm['down_numbers_per_client_round']:,} numbers down "
        f"({comm['down_bytes_per_client_round']:,} bytes) and {comm['up_numbers_per_client_round']:,} up; "
        f"{100 * comm['ratio_vs_backbone']:.4f} % of sending the backbone ({comm['backbone_numbers']:,} numbers). "
        f"Whole run: {comm['total_numbers']:,} numbers.",
        "",
        "## Time",
        "",
        f"Set-up {s['time']['setup_s']:.1f} s, rounds {s['time']['rounds_s']:.1f} s "
        f"({s['time']['mean_round_s']:.2f} s per round)"
        + (f", new clients' join rounds {s['new_clients']['seconds']:.1f} s."
           if (s.get("new_clients") or {}).get("seconds") is not None else "."),
    ]
    if s.get("hooks"):
        lines += ["", "## Hooks", "", "Config order: " + ", ".join(f"`{h}`" for h in s["hooks"]) + "."]
        for name, res in (s.get("hook_results") or {}).items():
            lines.append(f"- `{name}`: `{json.dumps(res)}`")
    lines += ["", "Files: `config.yaml` (resolved), `seeds.json`, `env.json`, `metrics.jsonl`, `summary.json`, "
              "`log.txt`, `checkpoints/`.", ""]
    return lines


def markdown_table(header, body) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def readable(v) -> str:
    """Numbers for reading: 4.55e-04, not 0.00045454545454545455."""
    if isinstance(v, float):
        return f"{v:.2e}" if v != 0 and abs(v) < 1e-2 else f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(readable(x) for x in v)
    return str(v)
