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
canary         both      record  canaries included with probability ½; one-run ε lower bound
                                 (Steinke et al. 2023) from the observer's and the server's score
=============  ========  ======  ===========================================================

DP envelope: with ``dp_client`` on, server-side probes are covered (everything the server holds is
post-processing of the releases) and observer probes are not (P̃_n and H_n are trained on raw data);
with ``dp_sgd`` on, record-level probes are covered and client-property probes are not. Covered
probes get the accountant's (ε, δ) — the largest over target clients — and the ROC region it allows.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from attacks.attribute_inference import client_properties, pooled_property_probe
from attacks.epsilon_bounds import one_run_audit
from attacks.linkability import linkability, source_inference
from attacks.lira import logit_confidence, run_lira
from attacks.membership import confidence_scores, fit_proxy_head, loss_scores, prompt_features, prompt_gradients
from attacks.metrics import dp_region, plot_roc, probe_metrics  # noqa: F401  (dp_region re-exported)
from pfedpg.client import load_into
from pfedpg.errors import ConfigError
from pfedpg.hooks import ClientData, Hook, register_hook
from pfedpg.models.device import is_out_of_memory

#: probe -> (threat model, unit of the question it asks). ``placement`` (which client holds x) moves a
#: record between two clients: no single neighbouring relation of either mechanism covers it.
PROBES: dict[str, tuple[str, str]] = {
    "attribute": ("server", "client"), "linkability": ("server", "client"), "loss": ("observer", "record"),
    "confidence": ("observer", "record"), "alignment": ("server", "record"), "lira": ("observer", "record"),
    "source": ("server", "placement"), "canary": ("server+observer", "record"), "rmia": ("observer", "record"),
    "descriptor": ("server", "record"),
}
NEEDS_AUX = ("alignment", "lira", "source", "canary", "rmia", "descriptor")
THREATS = {
    "server": "honest-but-curious server: sees P_n it sent, the released ΔP_n, d_n, G, P_base and the backbone; "
              "not the local heads",
    "observer": "external observer who can query the client's final model (adapted prompt and head)",
}
LIRA_DEFAULTS = {"shadows": 8, "epochs": 5, "online": False}
RMIA_DEFAULTS = {"references": 4, "epochs": 5, "a": 0.3, "gamma": 1.0, "population": 1000}
CANARY_DEFAULTS = {"per_client": 64, "guess_fraction": 0.5}


def _uniform_like(like: torch.Tensor, bound: float, g: torch.Generator) -> torch.Tensor:
    """U(−bound, bound) of ``like``'s shape, drawn on the CPU from ``g`` and moved to ``like``'s device."""
    return torch.empty(like.shape, dtype=like.dtype).uniform_(-bound, bound, generator=g).to(like.device)


def _pick(rng: np.random.Generator, n: int, k: int) -> torch.Tensor:
    return torch.from_numpy(np.sort(rng.permutation(n)[: min(n, k)]))


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
                raise ConfigError(f"leakage_audit.shadow_clients={shadow_clients!r} must be a count or a list of distinct client ids")
            self.shadow_ids = sorted(shadow_clients)
            shadow_clients = len(shadow_clients)
        for key, v in (("shadow_clients", shadow_clients), ("targets_per_client", targets_per_client),
                       ("alignment_rounds", alignment_rounds), ("source_targets_per_client", source_targets_per_client),
                       ("permutations", permutations), ("aux_per_head", aux_per_head)):
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key in ("shadow_clients", "permutations") else 1):
                raise ConfigError(f"leakage_audit.{key}={v!r} must be a {'non-negative' if key in ('shadow_clients', 'permutations') else 'positive'} integer")
        unknown = [p for p in (probes or []) if p not in PROBES]
        if unknown:
            raise ConfigError(f"leakage_audit.probes: unknown probe {unknown[0]!r}; choose from {', '.join(PROBES)}")
        if lira is not None and set(lira) - set(LIRA_DEFAULTS):
            raise ConfigError(f"leakage_audit.lira: unknown key {sorted(set(lira) - set(LIRA_DEFAULTS))[0]!r}; "
                              f"valid: {', '.join(LIRA_DEFAULTS)}")
        if canaries is not None and set(canaries) - set(CANARY_DEFAULTS):
            raise ConfigError(f"leakage_audit.canaries: unknown key {sorted(set(canaries) - set(CANARY_DEFAULTS))[0]!r}; "
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
        if self.canaries is not None and (not isinstance(self.canaries["per_client"], int) or self.canaries["per_client"] < 2):
            raise ConfigError("leakage_audit.canaries.per_client must be an integer >= 2")
        default = [p for p in PROBES if (shadow_clients or p not in NEEDS_AUX) and (p != "canary" or canaries)]
        self.probes = list(probes) if probes is not None else default
        self._probes_defaulted = probes is None
        need = [p for p in self.probes if p in NEEDS_AUX]
        if need and shadow_clients < 1:
            raise ConfigError(f"leakage_audit: probe {need[0]!r} needs auxiliary data; set shadow_clients >= 1 "
                              "(the last clients become the server's own)")
        if "canary" in self.probes and self.canaries is None:
            raise ConfigError("leakage_audit: probe 'canary' needs canaries: {per_client: 64} (it inserts them into the run)")
        if self.canaries is not None and "canary" not in self.probes:
            raise ConfigError("leakage_audit: canaries are set but probe 'canary' is not in probes; add it or drop canaries")
        self.shadow_count = shadow_clients
        self.targets_per_client, self.alignment_rounds = targets_per_client, alignment_rounds
        self.source_targets = source_targets_per_client
        self.permutations, self.presence_threshold, self.aux_per_head = permutations, presence_threshold, aux_per_head
        self.out = out
        self.records: dict[int, list[dict[str, Any]]] = {}
        self.descriptors: dict[int, list[torch.Tensor]] = {}
        self.initial_descriptors: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------
    def setup(self, ctx) -> None:
        n = ctx.num_clients
        if self.shadow_count >= n:
            raise ConfigError(f"leakage_audit.shadow_clients={self.shadow_count} leaves no target among {n} clients; lower it")
        if self.shadow_ids is not None and max(self.shadow_ids) >= n:
            raise ConfigError(f"leakage_audit.shadow_clients lists client {max(self.shadow_ids)}, but the run has {n} clients (0..{n - 1})")
        self.shadows = self.shadow_ids if self.shadow_ids is not None else list(range(n - self.shadow_count, n))
        # Clients whose releases another audit replaces (client_canary_audit's canary clients) are
        # neither targets nor shadows: what they send is not theirs.
        replaced = {c for h in ctx.hooks if hasattr(h, "replaces_release") for c in range(n) if h.replaces_release(c)}
        if replaced & set(self.shadows):
            raise ConfigError(f"leakage_audit: clients {sorted(replaced & set(self.shadows))} are client canaries and "
                              "shadows at once; choose other client_canary_audit.clients")
        self.targets = [c for c in range(n) if c not in self.shadows and c not in replaced]
        if not ctx.server.sends_prompts and any(p in self.probes for p in ("attribute", "linkability", "alignment", "source")):
            raise ConfigError(f"leakage_audit: method {ctx.config.method!r} sends nothing to the server; audit pfedpg or "
                              "fedvpt, or keep only the observer probes (loss, confidence, lira, canary)")
        desc = getattr(ctx.server, "descriptors", None)
        if desc is None and "descriptor" in self.probes:
            if not self._probes_defaulted:
                raise ConfigError(f"leakage_audit: probe 'descriptor' reads the server's client descriptors, and method "
                                  f"{ctx.config.method!r} has none; audit pfedpg or drop the probe")
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

    def client_data(self, ctx, *, client, round, data):
        if client not in self.canary_data:
            return data
        x, y, inc = self.canary_data[client]
        return ClientData(torch.cat([data.x, x[inc]]), torch.cat([data.y, y[inc]]))

    def incoming_deltas(self, ctx, *, round, deltas):
        sent = ctx.server.prompts_for(sorted(deltas))
        for n, d in deltas.items():
            # Kept on the CPU: what the server saw, for the probes at the end (a run's worth of K×D tensors).
            self.records.setdefault(n, []).append({"round": round, "sent": sent[n].detach().cpu().clone(),
                                                   "delta": d.detach().cpu().clone()})
        return deltas

    def end_of_round(self, ctx, *, round, record):
        desc = getattr(ctx.server, "descriptors", None)
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
    def _dp(self, ctx, clients: list[int] | None = None) -> dict[str, Any] | None:
        """The run's DP hook, read by duck typing (attacks never import defenses); ε is the largest
        over ``clients`` (default: the targets)."""
        for h in ctx.hooks:
            if hasattr(h, "statement") and hasattr(h, "epsilon"):
                st = h.statement()
                eps = max(h.epsilon(n) for n in (self.targets if clients is None else clients))
                unit = "client" if st["privacy_unit"].startswith("client") else "record"
                delta = float(st["delta"])
                note = None
                if unit == "client" and st.get("adjacency") == "add_remove":
                    # A change inside a client's data is a replacement = two add/remove steps.
                    eps, delta = 2 * eps, (1 + math.exp(min(eps, 700.0))) * delta
                    note = "add/remove client adjacency: group privacy over 2 steps (2ε, (1+e^ε)δ)"
                return {"hook": h.name, "unit": unit, "epsilon": eps, "delta": delta, "note": note}
        return None

    @staticmethod
    def _augment(ctx, component: str, i: int):
        """Shadow / reference model i's augmentation stream: the clients' recipe (``data.augment``)."""
        return None if ctx.config.data.augment == "none" else ctx.seeds.torch(component, client=i)

    def _covered(self, dp, probe_side: str, probe_unit: str) -> bool:
        if dp is None or not math.isfinite(dp["epsilon"]) or probe_unit == "placement":
            return False
        if dp["unit"] == "client":
            return probe_side == "server"
        return probe_unit == "record"

    def _proxy_head(self, ctx, client: int, rec: dict) -> tuple[torch.Tensor, torch.Tensor]:
        key = (client, rec["round"])
        if key not in self._heads:
            feats = prompt_features(ctx.model, rec["sent"], self._aux[0][self._aux_head_idx])
            self._heads[key] = fit_proxy_head(feats, self._aux[1][self._aux_head_idx], ctx.num_classes)
        return self._heads[key]

    def _alignment(self, ctx, client: int, recs: list[dict], x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        out = []
        for rec in recs:
            w, b = self._proxy_head(ctx, client, rec)
            load_into(ctx.model, prompt=rec["sent"], head_weight=w, head_bias=b)
            g = prompt_gradients(ctx.model, x, y).reshape(x.shape[0], -1)
            out.append(F.cosine_similarity(g, (-rec["delta"]).reshape(1, -1).to(g), dim=1).cpu().numpy())
        return np.mean(out, axis=0)

    def _new_client_attributes(self, ctx, joins, views, record, dp_new) -> None:
        """Attribute inference on the new clients: probes fitted on trained clients whose properties the
        server knows (the shadows; without shadows, every trained client — an upper bound on the
        attacker) score each new client's join-round features (d_new − d_new(0), the prompts sent, the
        released ΔP_new)."""
        from attacks.attribute_inference import transfer_property_probe

        info = [ctx.client_info[n] for n in range(ctx.num_clients)] + list(ctx.new_client_info)
        props = client_properties(info, presence_threshold=self.presence_threshold)
        known = self.shadows or list(range(ctx.num_clients))
        new_views = {"descriptor": {n: [(e["descriptor"] - e["initial_descriptor"]).numpy() for e in v]
                                    for n, v in joins.items() if v[0].get("descriptor") is not None},
                     "prompt": {n: [e["sent"].numpy() for e in v] for n, v in joins.items()},
                     "delta": {n: [e["delta"].numpy() for e in v] for n, v in joins.items()}}
        for view, feats in new_views.items():
            train = {n: f for n, f in views[view].items() if n in known}
            if not feats or not train:
                continue
            res = transfer_property_probe(train, feats, props, permutations=self.permutations,
                                          rng=ctx.seeds.numpy("audit.attribute_new", round=len(view)))
            res["features"] = {"descriptor": "d_new − d_new(0) after each join round (d_new(0): the mean descriptor)",
                               "prompt": "G(P_base, d_new) sent each join round",
                               "delta": "released ΔP_new each join round"}[view]
            res["known_clients"] = "shadow clients" if self.shadows else "every trained client (upper bound)"
            record(f"attribute_new_clients_{view}", res, dp_new)

    def end_of_run(self, ctx, *, summary):
        t_start = time.perf_counter()
        rng = ctx.seeds.numpy("audit.probes")
        out_dir = Path(ctx.run_dir) / self.out
        out_dir.mkdir(parents=True, exist_ok=True)
        dp = self._dp(ctx)
        states = ctx.client_states()
        results: dict[str, dict[str, Any]] = {}
        curves: dict[str, tuple] = {}
        timings: dict[str, float] = {}
        self._heads = {}
        if self.shadows:
            ax = torch.cat([torch.cat([ctx.train_data[s][0], ctx.eval_data[s][0]]) for s in self.shadows])
            ay = torch.cat([torch.cat([ctx.train_data[s][1], ctx.eval_data[s][1]]) for s in self.shadows])
            self._aux = (ax, ay)
            self._aux_head_idx = _pick(ctx.seeds.numpy("audit.aux"), ax.shape[0], self.aux_per_head)

        # Membership targets: members = training records, non-members = held-out records, per client.
        mem = {}
        for c in self.targets:
            (xm, ym), (xn, yn) = ctx.train_data[c], ctx.eval_data[c]
            im, inn = _pick(rng, xm.shape[0], self.targets_per_client), _pick(rng, xn.shape[0], self.targets_per_client)
            mem[c] = (torch.cat([xm[im], xn[inn]]), torch.cat([ym[im], yn[inn]]),
                      np.r_[np.ones(len(im), bool), np.zeros(len(inn), bool)])

        joins = {n: v for n, v in (getattr(ctx, "joins", None) or {}).items() if v}  # data.new_clients
        dp_new = self._dp(ctx, list(joins)) if joins else None

        def record(name, res, env=None):
            side, unit = PROBES[name.split("_")[0]]
            curve = res.pop("_curve", None)
            res["threat_model"] = THREATS["server"] if side.startswith("server") else THREATS["observer"]
            if side == "server+observer":
                res["threat_model"] = "see the per-score entries"
            res["privacy_unit_of_question"] = unit
            env = dp if env is None else env
            covered = self._covered(env, side, unit)
            res["dp_envelope"] = {"epsilon": env["epsilon"], "delta": env["delta"], "mechanism": env["hook"],
                                  **({"note": env["note"]} if env["note"] else {})} if covered else None
            results[name] = res
            if curve is not None:
                curves[name] = curve

        def observer_scores(fn):
            s, lab = [], []
            for c in self.targets:
                x, y, is_mem = mem[c]
                load_into(ctx.model, prompt=states[c].prompt, head_weight=states[c].head_weight,
                          head_bias=states[c].head_bias)
                s.append(fn(ctx.model, x, y).cpu().numpy())
                lab.append(is_mem)
            return np.concatenate(s), np.concatenate(lab)

        def run_probe(probe: str) -> None:
            """One probe, its results recorded through ``record``."""
            if probe == "attribute":
                info = [ctx.client_info[n] for n in range(ctx.num_clients)]
                props = client_properties(info, presence_threshold=self.presence_threshold)
                d0 = self.initial_descriptors
                views = {"descriptor": {n: [(d - d0[n]).numpy() for d in v] for n, v in self.descriptors.items()},
                         "prompt": {n: [r["sent"].numpy() for r in v] for n, v in self.records.items()},
                         "delta": {n: [r["delta"].numpy() for r in v] for n, v in self.records.items()}}
                for view, feats in views.items():
                    if not feats:
                        continue
                    res = pooled_property_probe(feats, props, permutations=self.permutations,
                                                rng=ctx.seeds.numpy("audit.attribute", round=len(view)),
                                                shadow_clients=self.shadows or None)
                    res["features"] = {"descriptor": "d_n − d_n(0) after each round (the server drew d_n(0))",
                                       "prompt": "P_n sent each round",
                                       "delta": "released ΔP_n each round"}[view]
                    record(f"attribute_{view}", res)
                if joins:
                    self._new_client_attributes(ctx, joins, views, record, dp_new)
            elif probe == "linkability":
                releases = {n: [r["delta"] for r in v] for n, v in self.records.items()}
                record("linkability", linkability(releases))
                if joins:  # a new client's later join releases matched against every client's earlier ones
                    res = linkability({**releases, **{n: [e["delta"] for e in v] for n, v in joins.items()}},
                                      query_clients=sorted(joins))
                    res["features"] = "new clients' released ΔP_new in their later join rounds, matched to every client's reference"
                    record("linkability_new_clients", res, dp_new)
            elif probe in ("loss", "confidence"):
                fn = loss_scores if probe == "loss" else confidence_scores
                s, lab = observer_scores(fn)
                record(probe, {**probe_metrics(s, lab), "_curve": (s, lab)})
            elif probe == "alignment":
                s, lab = [], []
                for c in self.targets:
                    recs = self.records.get(c, [])[-self.alignment_rounds:]
                    if not recs:
                        continue
                    x, y, is_mem = mem[c]
                    s.append(self._alignment(ctx, c, recs, x, y))
                    lab.append(is_mem)
                s, lab = np.concatenate(s), np.concatenate(lab)
                record("alignment", {**probe_metrics(s, lab), "rounds_used": self.alignment_rounds, "_curve": (s, lab)})
            elif probe == "descriptor":
                from attacks.membership import generated_prompt_scores

                # The final server state's generated prompts G(P_base, d_n): the targets' own and, as
                # references that never saw a target record, the shadow clients'.
                gen = ctx.server.prompts_for(self.targets + self.shadows)
                head_idx = self._aux_head_idx
                scored = generated_prompt_scores(
                    ctx.model, prompts=gen, references=[gen[s] for s in self.shadows], aux_x=self._aux[0][head_idx],
                    aux_y=self._aux[1][head_idx], num_classes=ctx.num_classes,
                    targets={c: (mem[c][0], mem[c][1]) for c in self.targets})
                lab = np.concatenate([mem[c][2] for c in self.targets])
                what = {"loss": "−loss under G(P_base, d_n) with a proxy head fitted on auxiliary data",
                        "confidence": "true-class probability under G(P_base, d_n) with that proxy head",
                        "calibrated": "mean loss under the shadows' generated prompts − loss under G(P_base, d_n)"}
                for kind, text in what.items():
                    sc = np.concatenate([scored[c][kind].cpu().numpy() for c in self.targets])
                    record(f"descriptor_{kind}", {**probe_metrics(sc, lab), "score": text,
                                                  "references": len(self.shadows), "_curve": (sc, lab)})
            elif probe == "lira":
                target_phi, lab = observer_scores(logit_confidence)
                tx = torch.cat([mem[c][0] for c in self.targets])
                ty = torch.cat([mem[c][1] for c in self.targets])
                init = _uniform_like(states[0].prompt, 0.1, ctx.seeds.torch("audit.lira.init"))
                if ctx.server.sends_prompts:  # shadows start where the server's clients start
                    init = torch.stack(list(ctx.server.prompts_for(self.shadows).values())).mean(0)
                s = run_lira(ctx.model, targets_x=tx, targets_y=ty, target_phi=target_phi, aux_x=self._aux[0],
                             aux_y=self._aux[1], num_classes=ctx.num_classes, client_cfg=ctx.config.client,
                             shadows=self.lira["shadows"], epochs=self.lira["epochs"], online=self.lira["online"],
                             init_prompt=init, rng=ctx.seeds.numpy("audit.lira"),
                             seed_stream=lambda i: ctx.seeds.torch("audit.lira.shadow", client=i),
                             augment_stream=lambda i: self._augment(ctx, "audit.lira.augment", i))
                record("lira", {**probe_metrics(s, lab), **{f"lira_{k}": v for k, v in self.lira.items()},
                                "_curve": (s, lab)})
            elif probe == "rmia":
                from attacks.rmia import reference_probabilities, rmia_scores, train_references, true_class_probability

                init = _uniform_like(states[0].prompt, 0.1, ctx.seeds.torch("audit.rmia.init"))
                if ctx.server.sends_prompts:  # references start where the server's clients start
                    init = torch.stack(list(ctx.server.prompts_for(self.shadows).values())).mean(0)
                o = self.rmia
                refs, z_idx = train_references(
                    ctx.model, aux_x=self._aux[0], aux_y=self._aux[1], references=o["references"], epochs=o["epochs"],
                    population=o["population"], num_classes=ctx.num_classes, client_cfg=ctx.config.client,
                    init_prompt=init, rng=ctx.seeds.numpy("audit.rmia"),
                    seed_stream=lambda i: ctx.seeds.torch("audit.rmia.reference", client=i),
                    augment_stream=lambda i: self._augment(ctx, "audit.rmia.augment", i))
                zx, zy = self._aux[0][z_idx], self._aux[1][z_idx]
                ref_z = reference_probabilities(ctx.model, refs, zx, zy)
                s, lab = [], []
                for c in self.targets:
                    x, y, is_mem = mem[c]
                    ref_x = reference_probabilities(ctx.model, refs, x, y)
                    load_into(ctx.model, prompt=states[c].prompt, head_weight=states[c].head_weight,
                              head_bias=states[c].head_bias)
                    s.append(rmia_scores(true_class_probability(ctx.model, x, y), ref_x,
                                         true_class_probability(ctx.model, zx, zy), ref_z, a=o["a"], gamma=o["gamma"]))
                    lab.append(is_mem)
                s, lab = np.concatenate(s), np.concatenate(lab)
                record("rmia", {**probe_metrics(s, lab), **{f"rmia_{k}": v for k, v in o.items()},
                                "population_size": int(len(z_idx)), "_curve": (s, lab)})
            elif probe == "source":
                cands = [c for c in self.targets if self.records.get(c)]
                xs, ys, owners = [], [], []
                for c in cands:
                    x, y = ctx.train_data[c]
                    idx = _pick(rng, x.shape[0], self.source_targets)
                    xs.append(x[idx]), ys.append(y[idx]), owners.append(np.full(len(idx), c))
                x, y, owners = torch.cat(xs), torch.cat(ys), np.concatenate(owners)
                mat = np.stack([self._alignment(ctx, m, self.records[m][-1:], x, y) for m in cands], axis=1)
                record("source", source_inference(mat, owners, cands))
            elif probe == "canary":
                scores_obs, scores_srv, inc = [], [], []
                for c in self.targets:
                    x, y, included = self.canary_data[c]
                    load_into(ctx.model, prompt=states[c].prompt, head_weight=states[c].head_weight,
                              head_bias=states[c].head_bias)
                    scores_obs.append(loss_scores(ctx.model, x, y).cpu().numpy())
                    recs = self.records.get(c, [])[-self.alignment_rounds:]
                    scores_srv.append(self._alignment(ctx, c, recs, x, y) if recs else np.zeros(len(y)))
                    inc.append(included.numpy())
                inc = np.concatenate(inc)
                delta = dp["delta"] if dp else 1e-5
                res = {}
                for side, sc in (("observer", np.concatenate(scores_obs)), ("server", np.concatenate(scores_srv))):
                    one = one_run_audit(sc, inc, delta=delta, guess_fraction=self.canaries["guess_fraction"])
                    covered = self._covered(dp, side, "record")
                    one.update(probe_metrics(sc, inc), threat_model=THREATS[side],
                               accountant_epsilon=dp["epsilon"] if covered else None)
                    one["violation"] = bool(covered and one["epsilon_lower_bound"] > dp["epsilon"])
                    # Whether this audit could have found a violation at all (its cap above ε).
                    one["can_fail"] = bool(covered and one["epsilon_cap"] > dp["epsilon"])
                    res[side] = one
                    curves[f"canary_{side}"] = (sc, inc)
                record("canary", {**res, "canaries_per_client": self.canaries["per_client"],
                                  "inclusion_probability": 0.5})

        for i, probe in enumerate(self.probes):
            t0 = time.perf_counter()
            ctx.log(f"leakage_audit: probe {i + 1}/{len(self.probes)}: {probe}")
            try:
                run_probe(probe)
            except (ValueError, RuntimeError) as e:  # one probe that breaks down must not lose the run
                if is_out_of_memory(e):
                    raise
                results[probe] = {"status": f"failed: {type(e).__name__}: {e}"}
                ctx.log(f"leakage_audit: probe {probe} failed ({type(e).__name__}: {e}); the other probes go on")
            timings[probe] = time.perf_counter() - t0

        rounds = summary.get("time", {})
        round_s = rounds.get("mean_train_round_s") or None
        for probe, sec in timings.items():
            for name, res in results.items():
                if name == probe or name.startswith(probe + "_"):
                    res["seconds"] = sec
                    res["seconds_per_training_round"] = sec / round_s if round_s else None
        audit = {"probes": results, "dp": dp, "targets": self.targets, "shadow_clients": self.shadows,
                 "seconds": time.perf_counter() - t_start, "mean_train_round_s": round_s}
        (out_dir / "audit.json").write_text(json.dumps(audit, indent=2, default=_json_default))
        np.savez(out_dir / "scores.npz", **{f"{k}__scores": v[0] for k, v in curves.items()},
                 **{f"{k}__labels": v[1] for k, v in curves.items()})
        if curves:
            plot_audit_roc(out_dir / "roc.png", curves, dp_envelope=dp, title=f"{ctx.config.method} seed {ctx.config.seed}")
        return {"probes": {k: headline(v) for k, v in results.items()}, "audit_dir": str(out_dir)}


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def headline(res: dict[str, Any]) -> dict[str, Any]:
    """The numbers a sweep table shows: AUC, TPR at 1% and 0.1% FPR (values only), targets."""
    if "observer" in res and "server" in res:  # the canary probe: one entry per score
        return {side: {"auc": res[side]["auc"], "epsilon_lower_bound": res[side]["epsilon_lower_bound"],
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


__all__ = ["LeakageAudit", "PROBES", "dp_region", "headline", "plot_audit_roc"]
