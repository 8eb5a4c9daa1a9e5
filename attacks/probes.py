"""The leakage audit's probes, one registered class each (``PROBE_TYPES``): what a probe reads, its
threat model (``side``: server, observer, or both) and the unit of the question it asks (``unit``:
client, record, or placement), and whether it needs the server's auxiliary data. The table of what
each reads is in :mod:`attacks.leakage`; the hook there records what the server holds during the run
and calls the probes, in registration order, at its end with one :class:`ProbeRun`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from attacks.attribute_inference import client_properties, pooled_property_probe
from attacks.linkability import linkability, source_inference
from attacks.lira import logit_confidence, run_lira
from attacks.membership import confidence_scores, fit_proxy_head, loss_scores, prompt_features, prompt_gradients
from attacks.metrics import probe_metrics
from attacks.one_run_bounds import audit_bounds
from attacks.tradeoff import epsilon_delta_family
from pfedpg.client import load_into
from pfedpg.privacy_result import DPEnvelope
from pfedpg.registry import Registry

THREATS = {
    "server": "honest-but-curious server: sees P_n it sent, the released ΔP_n, d_n, G, P_base and the backbone; "
              "not the local heads",
    "observer": "external observer who can query the client's final model (adapted prompt and head)",
}


def _uniform_like(like: torch.Tensor, bound: float, g: torch.Generator) -> torch.Tensor:
    """U(−bound, bound) of ``like``'s shape, drawn on the CPU from ``g`` and moved to ``like``'s device."""
    return torch.empty(like.shape, dtype=like.dtype).uniform_(-bound, bound, generator=g).to(like.device)


def pick(rng: np.random.Generator, n: int, k: int) -> torch.Tensor:
    """``min(n, k)`` of ``range(n)`` drawn without replacement, sorted."""
    return torch.from_numpy(np.sort(rng.permutation(n)[: min(n, k)]))


def covered(dp: DPEnvelope | None, probe_side: str, probe_unit: str) -> bool:
    """Whether the run's DP guarantee covers a probe's question (DESIGN §6; ``DPEnvelope.covers``)."""
    return dp is not None and dp.covers(probe_side, probe_unit)


class Probe:
    """One probe: ``run`` reads the run through ``ProbeRun`` and records its results there. Its
    options are its constructor's keyword arguments (``probes: [{name: ..., **options}]``)."""

    side: str = "server"  # server | observer | server+observer
    unit: str = "record"  # client | record | placement
    needs_aux: bool = False  # the server's auxiliary data (shadow clients)

    def run(self, run: "ProbeRun") -> None:
        raise NotImplementedError


PROBE_TYPES: Registry[type[Probe]] = Registry("leakage probe")



@dataclass
class ProbeRun:
    """What the probes of one audit share at the end of a run: the run (``ctx``), the hook with its
    options and records (``audit``), the membership targets (``mem``: per target client its records,
    labels and member flags), the DP envelope, and the results and ROC curves they record."""

    ctx: Any
    audit: Any
    rng: np.random.Generator
    states: dict[int, Any]
    mem: dict[int, tuple[torch.Tensor, torch.Tensor, np.ndarray]]
    dp: DPEnvelope | None
    joins: dict[int, list[dict[str, Any]]]
    dp_new: DPEnvelope | None
    aux: tuple[torch.Tensor, torch.Tensor] | None = None
    probe: Probe | None = None  # the probe running now: what it records carries its side and unit
    aux_head_idx: torch.Tensor | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    curves: dict[str, tuple] = field(default_factory=dict)
    heads: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def record(self, name: str, res: dict[str, Any], env: dict[str, Any] | None = None) -> None:
        """A probe's result under ``name`` (``probe`` or ``probe_variant``), with its threat model,
        unit and DP envelope (``env``: another envelope than the run's, e.g. the new clients')."""
        kind = self.probe
        curve = res.pop("_curve", None)
        res["threat_model"] = THREATS["server"] if kind.side.startswith("server") else THREATS["observer"]
        if kind.side == "server+observer":
            res["threat_model"] = "see the per-score entries"
        res["privacy_unit_of_question"] = kind.unit
        env = self.dp if env is None else env
        res["dp_envelope"] = {"epsilon": env.epsilon, "delta": env.delta, "mechanism": env.hook,
                              **({"note": env.note} if env.note else {})} \
            if covered(env, kind.side, kind.unit) else None
        self.results[name] = res
        if curve is not None:
            self.curves[name] = curve

    def observer_scores(self, fn: Callable) -> tuple[np.ndarray, np.ndarray]:
        """``fn(model, x, y)`` of each target's final model on its membership targets, and the labels."""
        s, lab = [], []
        for c in self.audit.targets:
            x, y, is_mem = self.mem[c]
            st = self.states[c]
            load_into(self.ctx.model, prompt=st.prompt, head_weight=st.head_weight, head_bias=st.head_bias)
            s.append(fn(self.ctx.model, x, y).cpu().numpy())
            lab.append(is_mem)
        return np.concatenate(s), np.concatenate(lab)

    def augment(self, component: str, i: int):
        """Shadow / reference model i's augmentation stream: the clients' recipe (``data.augment``)."""
        return None if self.ctx.config.data.augment == "none" else self.ctx.seeds.torch(component, client=i)

    def proxy_head(self, client: int, rec: dict) -> tuple[torch.Tensor, torch.Tensor]:
        key = (client, rec["round"])
        if key not in self.heads:
            feats = prompt_features(self.ctx.model, rec["sent"], self.aux[0][self.aux_head_idx])
            self.heads[key] = fit_proxy_head(feats, self.aux[1][self.aux_head_idx], self.ctx.num_classes)
        return self.heads[key]

    def alignment(self, client: int, recs: list[dict], x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        """cos(−ΔP, ∇_P ℓ(x)) at each release's sent prompt (proxy head), averaged over ``recs``."""
        out = []
        for rec in recs:
            w, b = self.proxy_head(client, rec)
            load_into(self.ctx.model, prompt=rec["sent"], head_weight=w, head_bias=b)
            g = prompt_gradients(self.ctx.model, x, y).reshape(x.shape[0], -1)
            out.append(F.cosine_similarity(g, (-rec["delta"]).reshape(1, -1).to(g), dim=1).cpu().numpy())
        return np.mean(out, axis=0)

    def new_client_attributes(self, views: dict[str, dict[int, list]]) -> None:
        """Attribute inference on the new clients: probes fitted on trained clients whose properties the
        server knows (the shadows; without shadows, every trained client — an upper bound on the
        attacker) score each new client's join-round features (d_new − d_new(0), the prompts sent, the
        released ΔP_new)."""
        from attacks.attribute_inference import transfer_property_probe

        info = [self.ctx.client_info[n] for n in range(self.ctx.num_clients)] + list(self.ctx.new_client_info)
        props = client_properties(info, presence_threshold=self.audit.presence_threshold)
        known = self.audit.shadows or list(range(self.ctx.num_clients))
        new_views = {"descriptor": {n: [(e["descriptor"] - e["initial_descriptor"]).numpy() for e in v]
                                    for n, v in self.joins.items() if v[0].get("descriptor") is not None},
                     "prompt": {n: [e["sent"].numpy() for e in v] for n, v in self.joins.items()},
                     "delta": {n: [e["delta"].numpy() for e in v] for n, v in self.joins.items()}}
        for view, feats in new_views.items():
            train = {n: f for n, f in views[view].items() if n in known}
            if not feats or not train:
                continue
            res = transfer_property_probe(train, feats, props, permutations=self.audit.permutations,
                                          rng=self.ctx.seeds.numpy("audit.attribute_new", round=len(view)))
            res["features"] = {"descriptor": "d_new − d_new(0) after each join round (d_new(0): the mean descriptor)",
                               "prompt": "G(P_base, d_new) sent each join round",
                               "delta": "released ΔP_new each join round"}[view]
            res["known_clients"] = "shadow clients" if self.audit.shadows else "every trained client (upper bound)"
            self.record(f"attribute_new_clients_{view}", res, self.dp_new)


@PROBE_TYPES.register("attribute")
class Attribute(Probe):
    """d_n − d_n(0), P_n and ΔP_n per round → client properties; grouped CV over clients, permutation p."""

    side, unit = "server", "client"

    def run(self, run: ProbeRun) -> None:
        audit = run.audit
        info = [run.ctx.client_info[n] for n in range(run.ctx.num_clients)]
        props = client_properties(info, presence_threshold=audit.presence_threshold)
        d0 = audit.initial_descriptors
        views = {"descriptor": {n: [(d - d0[n]).numpy() for d in v] for n, v in audit.descriptors.items()},
                 "prompt": {n: [r["sent"].numpy() for r in v] for n, v in audit.records.items()},
                 "delta": {n: [r["delta"].numpy() for r in v] for n, v in audit.records.items()}}
        for view, feats in views.items():
            if not feats:
                continue
            res = pooled_property_probe(feats, props, permutations=audit.permutations,
                                        rng=run.ctx.seeds.numpy("audit.attribute", round=len(view)),
                                        shadow_clients=audit.shadows or None)
            res["features"] = {"descriptor": "d_n − d_n(0) after each round (the server drew d_n(0))",
                               "prompt": "P_n sent each round",
                               "delta": "released ΔP_n each round"}[view]
            run.record(f"attribute_{view}", res)
        if run.joins:
            run.new_client_attributes(views)


@PROBE_TYPES.register("linkability")
class Linkability(Probe):
    """Later ΔP_n matched to each client's earlier releases (and the new clients' join releases)."""

    side, unit = "server", "client"

    def run(self, run: ProbeRun) -> None:
        audit = run.audit
        releases = {n: [r["delta"] for r in v] for n, v in audit.records.items()}
        run.record("linkability", linkability(releases))
        if run.joins:  # a new client's later join releases matched against every client's earlier ones
            res = linkability({**releases, **{n: [e["delta"] for e in v] for n, v in run.joins.items()}},
                              query_clients=sorted(run.joins))
            res["features"] = ("new clients' released ΔP_new in their later join rounds, "
                               "matched to every client's reference")
            run.record("linkability_new_clients", res, run.dp_new)


@PROBE_TYPES.register("loss")
class Loss(Probe):
    """−loss of the client's final model (P̃_n, H_n) on its members and held-out records."""

    side, unit = "observer", "record"

    def run(self, run: ProbeRun) -> None:
        s, lab = run.observer_scores(loss_scores)
        run.record("loss", {**probe_metrics(s, lab), "_curve": (s, lab)})


@PROBE_TYPES.register("confidence")
class Confidence(Probe):
    """Probability of the true label under the client's final model."""

    side, unit = "observer", "record"

    def run(self, run: ProbeRun) -> None:
        s, lab = run.observer_scores(confidence_scores)
        run.record("confidence", {**probe_metrics(s, lab), "_curve": (s, lab)})


@PROBE_TYPES.register("alignment")
class Alignment(Probe):
    """cos(−ΔP_n, ∇_P ℓ(x)) at the sent P_n with a proxy head fitted on aux data, over the last releases."""

    side, unit, needs_aux = "server", "record", True

    def run(self, run: ProbeRun) -> None:
        audit = run.audit
        s, lab = [], []
        for c in audit.targets:
            recs = audit.records.get(c, [])[-audit.alignment_rounds:]
            if not recs:
                continue
            x, y, is_mem = run.mem[c]
            s.append(run.alignment(c, recs, x, y))
            lab.append(is_mem)
        s, lab = np.concatenate(s), np.concatenate(lab)
        run.record("alignment", {**probe_metrics(s, lab), "rounds_used": audit.alignment_rounds, "_curve": (s, lab)})


@PROBE_TYPES.register("lira")
class LiRA(Probe):
    """LiRA with shadow prompts trained on aux data."""

    side, unit, needs_aux = "observer", "record", True

    def run(self, run: ProbeRun) -> None:
        audit = run.audit
        target_phi, lab = run.observer_scores(logit_confidence)
        tx = torch.cat([run.mem[c][0] for c in audit.targets])
        ty = torch.cat([run.mem[c][1] for c in audit.targets])
        init = _uniform_like(run.states[0].prompt, 0.1, run.ctx.seeds.torch("audit.lira.init"))
        if run.ctx.server.sends_prompts:  # shadows start where the server's clients start
            init = torch.stack(list(run.ctx.server.prompts_for(audit.shadows).values())).mean(0)
        s = run_lira(run.ctx.model, targets_x=tx, targets_y=ty, target_phi=target_phi, aux_x=run.aux[0],
                     aux_y=run.aux[1], num_classes=run.ctx.num_classes, client_cfg=run.ctx.config.client,
                     shadows=audit.lira["shadows"], epochs=audit.lira["epochs"], online=audit.lira["online"],
                     init_prompt=init, rng=run.ctx.seeds.numpy("audit.lira"),
                     seed_stream=lambda i: run.ctx.seeds.torch("audit.lira.shadow", client=i),
                     augment_stream=lambda i: run.augment("audit.lira.augment", i))
        run.record("lira", {**probe_metrics(s, lab), **{f"lira_{k}": v for k, v in audit.lira.items()},
                        "_curve": (s, lab)})


@PROBE_TYPES.register("source")
class Source(Probe):
    """Which target client holds a training record (alignment at each client's last release)."""

    side, unit, needs_aux = "server", "placement", True

    def run(self, run: ProbeRun) -> None:
        audit = run.audit
        cands = [c for c in audit.targets if audit.records.get(c)]
        xs, ys, owners = [], [], []
        for c in cands:
            x, y = run.ctx.train_data[c]
            idx = pick(run.rng, x.shape[0], audit.source_targets)
            xs.append(x[idx]), ys.append(y[idx]), owners.append(np.full(len(idx), c))
        x, y, owners = torch.cat(xs), torch.cat(ys), np.concatenate(owners)
        mat = np.stack([run.alignment(m, audit.records[m][-1:], x, y) for m in cands], axis=1)
        run.record("source", source_inference(mat, owners, cands))


def record_canary_bounds(scores, inserted, *, claim: float | None, delta: float,
                         guess_fraction: float) -> dict[str, Any]:
    """The black-box record canaries' one-run bounds, against the accountant's (ε, δ) where DP covers
    the view: the game is far from the idealised one (a loss or an alignment per record), so the
    family is the assumption-free (ε, δ)-DP; Steinke et al.'s bound beside it at ``guess_fraction``."""
    return audit_bounds(scores, inserted, family=epsilon_delta_family(delta), claimed_epsilon=claim, delta=delta,
                        steinke_guess_fraction=guess_fraction)


@PROBE_TYPES.register("canary")
class Canary(Probe):
    """Canaries included with probability ½; one-run ε lower bounds from the observer's and the server's score."""

    side, unit, needs_aux = "server+observer", "record", True

    def run(self, run: ProbeRun) -> None:
        audit = run.audit
        scores_obs, scores_srv, inc = [], [], []
        for c in audit.targets:
            x, y, included = audit.canary_data[c]
            load_into(run.ctx.model, prompt=run.states[c].prompt, head_weight=run.states[c].head_weight,
                      head_bias=run.states[c].head_bias)
            scores_obs.append(loss_scores(run.ctx.model, x, y).cpu().numpy())
            recs = audit.records.get(c, [])[-audit.alignment_rounds:]
            scores_srv.append(run.alignment(c, recs, x, y) if recs else np.zeros(len(y)))
            inc.append(included.numpy())
        inc = np.concatenate(inc)
        delta = run.dp.delta if run.dp else 1e-5
        res = {}
        for side, sc in (("observer", np.concatenate(scores_obs)), ("server", np.concatenate(scores_srv))):
            claim = run.dp.epsilon if covered(run.dp, side, "record") else None
            res[side] = {**record_canary_bounds(sc, inc, claim=claim, delta=delta,
                                                guess_fraction=audit.canaries["guess_fraction"]),
                         **probe_metrics(sc, inc), "threat_model": THREATS[side], "accountant_epsilon": claim}
            run.curves[f"canary_{side}"] = (sc, inc)
        run.record("canary", {**res, "canaries_per_client": audit.canaries["per_client"],
                          "inclusion_probability": 0.5})


@PROBE_TYPES.register("rmia")
class RMIA(Probe):
    """Offline RMIA (Zarifzadeh et al. 2024) with reference prompts and a population held out of the aux data."""

    side, unit, needs_aux = "observer", "record", True

    def run(self, run: ProbeRun) -> None:
        from attacks.rmia import reference_probabilities, rmia_scores, train_references, true_class_probability

        audit = run.audit
        init = _uniform_like(run.states[0].prompt, 0.1, run.ctx.seeds.torch("audit.rmia.init"))
        if run.ctx.server.sends_prompts:  # references start where the server's clients start
            init = torch.stack(list(run.ctx.server.prompts_for(audit.shadows).values())).mean(0)
        o = audit.rmia
        refs, z_idx = train_references(
            run.ctx.model, aux_x=run.aux[0], aux_y=run.aux[1], references=o["references"], epochs=o["epochs"],
            population=o["population"], num_classes=run.ctx.num_classes, client_cfg=run.ctx.config.client,
            init_prompt=init, rng=run.ctx.seeds.numpy("audit.rmia"),
            seed_stream=lambda i: run.ctx.seeds.torch("audit.rmia.reference", client=i),
            augment_stream=lambda i: run.augment("audit.rmia.augment", i))
        zx, zy = run.aux[0][z_idx], run.aux[1][z_idx]
        ref_z = reference_probabilities(run.ctx.model, refs, zx, zy)
        s, lab = [], []
        for c in audit.targets:
            x, y, is_mem = run.mem[c]
            ref_x = reference_probabilities(run.ctx.model, refs, x, y)
            load_into(run.ctx.model, prompt=run.states[c].prompt, head_weight=run.states[c].head_weight,
                      head_bias=run.states[c].head_bias)
            s.append(rmia_scores(true_class_probability(run.ctx.model, x, y), ref_x,
                                 true_class_probability(run.ctx.model, zx, zy), ref_z, a=o["a"], gamma=o["gamma"]))
            lab.append(is_mem)
        s, lab = np.concatenate(s), np.concatenate(lab)
        run.record("rmia", {**probe_metrics(s, lab), **{f"rmia_{k}": v for k, v in o.items()},
                        "population_size": int(len(z_idx)), "_curve": (s, lab)})


@PROBE_TYPES.register("descriptor")
class Descriptor(Probe):
    """Loss and confidence under the final G(P_base, d_n) with a proxy head, and that loss calibrated by the shadows."""

    side, unit, needs_aux = "server", "record", True

    def run(self, run: ProbeRun) -> None:
        from attacks.membership import generated_prompt_scores

        audit = run.audit
        # The final server state's generated prompts G(P_base, d_n): the targets' own and, as
        # references that never saw a target record, the shadow clients'.
        gen = run.ctx.server.prompts_for(audit.targets + audit.shadows)
        head_idx = run.aux_head_idx
        scored = generated_prompt_scores(
            run.ctx.model, prompts=gen, references=[gen[s] for s in audit.shadows], aux_x=run.aux[0][head_idx],
            aux_y=run.aux[1][head_idx], num_classes=run.ctx.num_classes,
            targets={c: (run.mem[c][0], run.mem[c][1]) for c in audit.targets})
        lab = np.concatenate([run.mem[c][2] for c in audit.targets])
        what = {"loss": "−loss under G(P_base, d_n) with a proxy head fitted on auxiliary data",
                "confidence": "true-class probability under G(P_base, d_n) with that proxy head",
                "calibrated": "mean loss under the shadows' generated prompts − loss under G(P_base, d_n)"}
        for kind, text in what.items():
            sc = np.concatenate([scored[c][kind].cpu().numpy() for c in audit.targets])
            run.record(f"descriptor_{kind}", {**probe_metrics(sc, lab), "score": text,
                                          "references": len(audit.shadows), "_curve": (sc, lab)})
