"""``leakage_audit``: what the curious server (and an observer of a client's model) learns, measured
inside a real run (DESIGN §6). Add it to a run's hooks, or let ``pfedpg-eval audit`` do so.

During the run the hook records what the server holds — per round and client the prompt P_n it
sent, the released ΔP_n as received (after any client-side DP), and the descriptor d_n after the
step — and, with ``canaries``, inserts canary records into the target clients' data. At the end of
the run it runs the probes and writes ``RUN_DIR/audit/audit.json``, ``scores.npz`` and a log–log
ROC plot; the summary gets the headline numbers.

Clients: the ``shadow_clients`` (the last k, or listed ids) are the server's own (it runs them on its auxiliary
data and knows their properties); the others are the targets. Auxiliary data = the shadows'
train and held-out records: disjoint from the targets' records and, by the partition, from the
backbone's pretraining split.

Probes (name: threat model, unit — what it reads):

=============  ========  ======  ===========================================================
attribute      server    client  d_n − d_n(0), P_n and ΔP_n per round → client properties (domain, class
                                 presence, label skew); grouped CV over clients, permutation p
linkability    server    client  later ΔP_n matched to each client's earlier releases
                                 (with data.new_clients, also ``attribute_new_clients_*`` and
                                 ``linkability_new_clients``: the same on the new clients'
                                 join rounds, attribute probes fitted on trained clients)
loss           observer  record  −loss of the client's final model (P̃_n, H_n); members = its
                                 training records, non-members = its held-out records
confidence     observer  record  probability of the true label under the final model
alignment      server    record  cos(−ΔP_n, ∇_P ℓ(x)) at the sent P_n, proxy head fitted on aux data,
                                 averaged over the client's last ``alignment_rounds`` releases
descriptor     server    record  loss and confidence under the generated prompt G(P_base, d_n) of the
                                 final server state with a proxy head fitted on aux data, and that
                                 loss calibrated by the shadows' generated prompts (pFedPG only)
lira           observer  record  LiRA with ``lira.shadows`` shadow prompts trained on aux data
rmia           observer  record  offline RMIA (Zarifzadeh et al. 2024) with ``rmia.references``
                                 reference prompts and a population held out of the aux data
source         server    place.  which target client holds a training record (alignment at each
                                 client's last release)
canary         both      record  canaries included with probability ½; one-run ε lower bounds
                                 (attacks.one_run_bounds, (ε, δ) family; Steinke et al. 2023 beside
                                 them) from the observer's and the server's score
=============  ========  ======  ===========================================================

DP envelope: with ``dp_client`` on, server-side probes are covered (everything the server holds is
post-processing of the releases) and observer probes are not (P̃_n and H_n are trained on raw data);
with ``dp_sgd`` on, record-level probes are covered and client-property probes are not. Covered
probes get the accountant's (ε, δ) — the largest over target clients — and the ROC region it allows.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.metrics import dp_region, plot_roc  # noqa: F401  (dp_region re-exported)
from attacks.probes import PROBE_TYPES, ProbeRun, pick
from pfedpg import jsonio
from pfedpg.context import ClientSide, RunContext, ServerSide
from pfedpg.errors import ConfigError
from pfedpg.hooks import Hook, register_hook
from pfedpg.jobs import ClientData
from pfedpg.models.device import is_out_of_memory
from pfedpg.privacy_result import DPEnvelope, mechanism_of
from pfedpg.registry import Spec

LIRA_DEFAULTS = {"shadows": 8, "epochs": 5, "online": False}
RMIA_DEFAULTS = {"references": 4, "epochs": 5, "a": 0.3, "gamma": 1.0, "population": 1000}
CANARY_DEFAULTS = {"per_client": 64, "guess_fraction": 0.5}


def probe_specs(specs: list | None) -> tuple[list[str] | None, dict[str, dict[str, Any]]]:
    """``leakage_audit.probes`` (names, or ``{name: ..., **options}``) -> (names, options by name), each
    checked against the live registry and the probe's signature."""
    if specs is None:
        return None, {}
    names, options = [], {}
    for i, entry in enumerate(specs):
        spec = Spec.parse(entry, f"leakage_audit.probes[{i}]")
        name, opts = spec.name, spec.options
        if name not in PROBE_TYPES:
            raise ConfigError(f"leakage_audit.probes: unknown probe {name!r}; choose from "
                              f"{', '.join(PROBE_TYPES.in_order())}")
        if name in names:
            raise ConfigError(f"leakage_audit.probes[{i}]: probe {name!r} is listed twice")
        PROBE_TYPES.construct(name, opts, where=f"leakage_audit.probes[{i}] ({name})")  # the options' check
        names.append(name)
        if opts:
            options[name] = opts
    return names, options


@register_hook("leakage_audit")
class LeakageAudit(Hook):
    """Options: ``probes`` (default: every probe the configuration allows), ``shadow_clients``
    (a count k: the last k clients are the server's; or a list of client ids, e.g. one per domain;
    needed by alignment, lira, rmia, source, canary, descriptor),
    ``targets_per_client`` members and as many non-members per target client, ``alignment_rounds``,
    ``source_targets_per_client``, ``permutations`` (attribute probe), ``presence_threshold``,
    ``aux_per_head`` (aux records per proxy head), ``lira: {shadows, epochs, online}``,
    ``rmia: {references, epochs, a, gamma, population}`` (offline RMIA),
    ``canaries: {per_client, guess_fraction}`` (opt-in: it changes the training data), ``out``."""

    inprocess_only = "the audit plays its threat models on every client's data and model from one process"

    def __init__(self, *, probes: list[str] | None = None, shadow_clients: int = 0, targets_per_client: int = 100,
                 alignment_rounds: int = 3, source_targets_per_client: int = 25, permutations: int = 50,
                 presence_threshold: float = 0.05, aux_per_head: int = 512, lira: dict | None = None,
                 canaries: dict | None = None, rmia: dict | None = None, out: str = "audit"):
        super().__init__()
        self.shadow_ids = None
        if isinstance(shadow_clients, (list, tuple)):
            if not shadow_clients or any(not isinstance(c, int) or c < 0 for c in shadow_clients) \
                    or len(set(shadow_clients)) != len(shadow_clients):
                raise ConfigError(f"leakage_audit.shadow_clients={shadow_clients!r} must be a count or a list of "
                                  "distinct client ids")
            self.shadow_ids = sorted(shadow_clients)
            shadow_clients = len(shadow_clients)
        for key, v in (("shadow_clients", shadow_clients), ("targets_per_client", targets_per_client),
                       ("alignment_rounds", alignment_rounds), ("source_targets_per_client", source_targets_per_client),
                       ("permutations", permutations), ("aux_per_head", aux_per_head)):
            if not isinstance(v, int) or isinstance(v, bool) \
                    or v < (0 if key in ("shadow_clients", "permutations") else 1):
                raise ConfigError(f"leakage_audit.{key}={v!r} must be a "
                                  f"{'non-negative' if key in ('shadow_clients', 'permutations') else 'positive'} "
                                  "integer")
        probes, self.probe_options = probe_specs(probes)
        if lira is not None and set(lira) - set(LIRA_DEFAULTS):
            raise ConfigError(f"leakage_audit.lira: unknown key {sorted(set(lira) - set(LIRA_DEFAULTS))[0]!r}; "
                              f"valid: {', '.join(LIRA_DEFAULTS)}")
        if canaries is not None and set(canaries) - set(CANARY_DEFAULTS):
            raise ConfigError("leakage_audit.canaries: unknown key "
                              f"{sorted(set(canaries) - set(CANARY_DEFAULTS))[0]!r}; "
                              f"valid: {', '.join(CANARY_DEFAULTS)}")
        if rmia is not None and set(rmia) - set(RMIA_DEFAULTS):
            raise ConfigError(f"leakage_audit.rmia: unknown key {sorted(set(rmia) - set(RMIA_DEFAULTS))[0]!r}; "
                              f"valid: {', '.join(RMIA_DEFAULTS)}")
        self.rmia = {**RMIA_DEFAULTS, **(rmia or {})}
        for key in ("references", "epochs", "population"):
            if not isinstance(self.rmia[key], int) or isinstance(self.rmia[key], bool) or self.rmia[key] < 1:
                raise ConfigError(f"leakage_audit.rmia.{key}={self.rmia[key]!r} must be a positive integer")
        if not 0 <= self.rmia["a"] <= 1:
            raise ConfigError(f"leakage_audit.rmia.a={self.rmia['a']!r} must be in [0, 1] (the offline prior's slope)")
        if not self.rmia["gamma"] > 0:
            raise ConfigError(f"leakage_audit.rmia.gamma={self.rmia['gamma']!r} must be > 0")
        self.lira = {**LIRA_DEFAULTS, **(lira or {})}
        if not isinstance(self.lira["shadows"], int) or self.lira["shadows"] < (2 if self.lira["online"] else 1):
            raise ConfigError(f"leakage_audit.lira.shadows={self.lira['shadows']!r} must be >= 1 (>= 2 online)")
        self.canaries = None if canaries is None else {**CANARY_DEFAULTS, **canaries}
        if self.canaries is not None and (not isinstance(self.canaries["per_client"], int)
                                          or self.canaries["per_client"] < 2):
            raise ConfigError("leakage_audit.canaries.per_client must be an integer >= 2")
        default = [p for p in PROBE_TYPES.in_order() if (shadow_clients or not PROBE_TYPES.get(p).needs_aux)
                   and (p != "canary" or canaries)]
        self.probes = list(probes) if probes is not None else default
        self._probes_defaulted = probes is None
        need = [p for p in self.probes if PROBE_TYPES.get(p).needs_aux]
        if need and shadow_clients < 1:
            raise ConfigError(f"leakage_audit: probe {need[0]!r} needs auxiliary data; set shadow_clients >= 1 "
                              "(the last clients become the server's own)")
        if "canary" in self.probes and self.canaries is None:
            raise ConfigError("leakage_audit: probe 'canary' needs canaries: {per_client: 64} "
                              "(it inserts them into the run)")
        if self.canaries is not None and "canary" not in self.probes:
            raise ConfigError("leakage_audit: canaries are set but probe 'canary' is not in probes; "
                              "add it or drop canaries")
        self.shadow_count = shadow_clients
        self.targets_per_client, self.alignment_rounds = targets_per_client, alignment_rounds
        self.source_targets = source_targets_per_client
        self.permutations, self.presence_threshold, self.aux_per_head = permutations, presence_threshold, aux_per_head
        self.out = out
        self.records: dict[int, list[dict[str, Any]]] = {}
        self.descriptors: dict[int, list[torch.Tensor]] = {}
        self.initial_descriptors: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------
    def fixes_rounds(self) -> bool:
        return True  # scores of the last rounds' releases

    def check(self, facts) -> None:
        n = facts.num_clients
        if self.shadow_count >= n:
            raise ConfigError(f"leakage_audit.shadow_clients={self.shadow_count} leaves no target among {n} clients; "
                              "lower it")
        if self.shadow_ids is not None and max(self.shadow_ids) >= n:
            raise ConfigError(f"leakage_audit.shadow_clients lists client {max(self.shadow_ids)}, "
                              f"but the run has {n} clients (0..{n - 1})")

    def setup(self, ctx: RunContext) -> None:
        self.check(ctx.facts)
        n = ctx.num_clients
        self.shadows = self.shadow_ids if self.shadow_ids is not None else list(range(n - self.shadow_count, n))
        self.targets = [c for c in range(n) if c not in self.shadows]
        # Clients another hook added for its own audit (canary clients) hold no data: not recorded.
        self.audit_ids = {c for ids in ctx.audit_clients.values() for c in ids}
        if not ctx.server.sends_prompts and any(p in self.probes
                                                for p in ("attribute", "linkability", "alignment", "source")):
            raise ConfigError(f"leakage_audit: method {ctx.config.method!r} sends nothing to the server; audit "
                              "pfedpg or fedvpt, or keep only the observer probes (loss, confidence, lira, canary)")
        desc = ctx.server.client_descriptors()
        if desc is None and "descriptor" in self.probes:
            if not self._probes_defaulted:
                raise ConfigError("leakage_audit: probe 'descriptor' reads the server's client descriptors, "
                                  f"and method {ctx.config.method!r} has none; audit pfedpg or drop the probe")
            self.probes = [p for p in self.probes if p != "descriptor"]
        if desc is not None and self.initial_descriptors is None:  # (a resumed run restores it instead)
            # The server drew d_n itself; what training wrote into them is d_n − d_n(0).
            self.initial_descriptors = desc.detach().cpu().clone()
        self.canary_data = {}
        if self.canaries is not None:
            x0 = ctx.train_data[0][0]
            for c in self.targets:
                g = ctx.seeds.torch("audit.canary", client=c)
                m = self.canaries["per_client"]
                # Uniform-noise images (uint8 records at the stored size, like every record) with random
                # labels: out of distribution, so memorising one is the only way to fit it (a strong
                # canary), and each is independent of the others.
                x = torch.randint(0, 256, (m, *x0.shape[1:]), generator=g, dtype=torch.uint8)
                y = torch.randint(0, ctx.num_classes, (m,), generator=g)
                included = torch.rand(m, generator=g) < 0.5
                self.canary_data[c] = (x, y, included)

    def client_data(self, ctx: ClientSide, *, client, round, data):
        if client not in self.canary_data:
            return data
        x, y, inc = self.canary_data[client]
        return ClientData(torch.cat([data.x, x[inc]]), torch.cat([data.y, y[inc]]))

    def incoming_deltas(self, ctx: ServerSide, *, round, deltas):
        mine = sorted(n for n in deltas if n not in self.audit_ids)
        sent = ctx.server.prompts_for(mine)
        for n in mine:
            d = deltas[n]
            # Kept on the CPU: what the server saw, for the probes at the end (a run's worth of K×D tensors).
            self.records.setdefault(n, []).append({"round": round, "sent": sent[n].detach().cpu().clone(),
                                                   "delta": d.detach().cpu().clone()})
        return deltas

    def end_of_round(self, ctx: RunContext, *, round, record):
        desc = ctx.server.client_descriptors()
        if desc is not None:
            for n in ctx.schedule[round - 1]:
                self.descriptors.setdefault(n, []).append(desc[n].detach().cpu().clone())
        return None

    def state_dict(self):
        return {"records": {str(n): r for n, r in self.records.items()},
                "descriptors": {str(n): d for n, d in self.descriptors.items()},
                "initial_descriptors": self.initial_descriptors}

    def load_state_dict(self, state):
        self.records = {int(n): r for n, r in state["records"].items()}
        self.descriptors = {int(n): d for n, d in state["descriptors"].items()}
        self.initial_descriptors = state.get("initial_descriptors")

    # ------------------------------------------------------------------------------------------
    def _dp(self, ctx, clients: list[int] | None = None) -> DPEnvelope | None:
        """The run's DP envelope (``pfedpg.privacy_result``: attacks never import defenses) over
        ``clients`` (default: the targets)."""
        mech = mechanism_of(ctx.hooks)
        return None if mech is None else DPEnvelope.of(mech, self.targets if clients is None else clients)

    def end_of_run(self, ctx: RunContext, *, summary):
        t_start = time.perf_counter()
        out_dir = Path(ctx.run_dir) / self.out
        out_dir.mkdir(parents=True, exist_ok=True)
        run = self._probe_run(ctx)
        timings: dict[str, float] = {}
        for i, probe in enumerate(self.probes):
            t0 = time.perf_counter()
            ctx.log(f"leakage_audit: probe {i + 1}/{len(self.probes)}: {probe}")
            try:
                run.probe = PROBE_TYPES.construct(probe, self.probe_options.get(probe, {}),
                                                  where=f"leakage_audit probe {probe}")
                run.probe.run(run)
            except (ValueError, RuntimeError) as e:  # one probe that breaks down must not lose the run
                if is_out_of_memory(e):
                    raise
                run.results[probe] = {"status": f"failed: {type(e).__name__}: {e}"}
                ctx.log(f"leakage_audit: probe {probe} failed ({type(e).__name__}: {e}); the other probes go on")
            timings[probe] = time.perf_counter() - t0

        results, curves = run.results, run.curves
        round_s = summary.get("time", {}).get("mean_train_round_s") or None
        for probe, sec in timings.items():
            for name, res in results.items():
                if name == probe or name.startswith(probe + "_"):
                    res["seconds"] = sec
                    res["seconds_per_training_round"] = sec / round_s if round_s else None
        audit = {"probes": results, "dp": run.dp and run.dp.to_dict(), "targets": self.targets,
                 "shadow_clients": self.shadows, "seconds": time.perf_counter() - t_start,
                 "mean_train_round_s": round_s}
        (out_dir / "audit.json").write_text(jsonio.dumps(audit, indent=2))
        np.savez(out_dir / "scores.npz", **{f"{k}__scores": v[0] for k, v in curves.items()},
                 **{f"{k}__labels": v[1] for k, v in curves.items()})
        if curves:
            plot_audit_roc(out_dir / "roc.png", curves, dp_envelope=run.dp and run.dp.to_dict(),
                           title=f"{ctx.config.method} seed {ctx.config.seed}")
        return {"probes": {k: headline(v) for k, v in results.items()}, "audit_dir": str(out_dir)}

    def _probe_run(self, ctx) -> ProbeRun:
        """What the probes share: the membership targets (members = training records, non-members =
        held-out records, per target client), the auxiliary data, the DP envelopes."""
        rng = ctx.seeds.numpy("audit.probes")
        dp = self._dp(ctx)
        states = ctx.client_states()
        aux = aux_head_idx = None
        if self.shadows:
            ax = torch.cat([torch.cat([ctx.train_data[s][0], ctx.eval_data[s][0]]) for s in self.shadows])
            ay = torch.cat([torch.cat([ctx.train_data[s][1], ctx.eval_data[s][1]]) for s in self.shadows])
            aux = (ax, ay)
            aux_head_idx = pick(ctx.seeds.numpy("audit.aux"), ax.shape[0], self.aux_per_head)
        mem = {}
        for c in self.targets:
            (xm, ym), (xn, yn) = ctx.train_data[c], ctx.eval_data[c]
            im, inn = pick(rng, xm.shape[0], self.targets_per_client), pick(rng, xn.shape[0], self.targets_per_client)
            mem[c] = (torch.cat([xm[im], xn[inn]]), torch.cat([ym[im], yn[inn]]),
                      np.r_[np.ones(len(im), bool), np.zeros(len(inn), bool)])
        joins = {n: v for n, v in ctx.joins.items() if v}  # data.new_clients
        dp_new = self._dp(ctx, list(joins)) if joins else None
        return ProbeRun(ctx=ctx, audit=self, rng=rng, states=states, mem=mem, dp=dp, joins=joins, dp_new=dp_new,
                        aux=aux, aux_head_idx=aux_head_idx)


def headline(res: dict[str, Any]) -> dict[str, Any]:
    """The numbers a sweep table shows: AUC, TPR at 1% and 0.1% FPR (values only), targets."""
    if "observer" in res and "server" in res:  # the canary probe: one entry per score
        return {side: {"auc": res[side]["auc"], "epsilon_lb": res[side]["epsilon_lb"],
                       "epsilon_cap": res[side]["epsilon_cap"], "accountant_epsilon": res[side]["accountant_epsilon"]}
                for side in ("observer", "server")}
    if "auc" not in res:
        return {"status": res.get("status")}
    return {"auc": res["auc"], "tpr_at_1pct_fpr": res["tpr_at_1pct_fpr"]["value"],
            "tpr_at_0.1pct_fpr": res["tpr_at_0.1pct_fpr"]["value"], "n_targets": res["n_targets"]}


def plot_audit_roc(path: Path, curves: dict[str, tuple], *, dp_envelope: dict | None, title: str) -> Path:
    """Log–log ROC of every probe, with the region the accountant's (ε, δ) allows when DP is on."""
    env = None
    if dp_envelope is not None:
        env = (dp_envelope["epsilon"], dp_envelope["delta"],
               f"({dp_envelope['epsilon']:.2g}, {dp_envelope['delta']:.0e})-DP limit "
               f"({dp_envelope.get('mechanism') or dp_envelope.get('hook')}; covered probes only)")
    return plot_roc(path, curves, title=title, envelope=env)


__all__ = ["LeakageAudit", "PROBE_TYPES", "dp_region", "headline", "plot_audit_roc"]
