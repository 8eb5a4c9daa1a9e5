"""Each client's accountant history against the mechanism's own record of what it did (DESIGN §5).

An ε can agree with itself and be wrong for the mechanism: a sampling rate from all clients' records,
or one step fewer, fed to calibration and accountant alike passes every check that holds ε against the
target or against a fresh accountant told the same story (an independent review measured ε = 4.00
reported for a real 8.45). Here three sources that share no code path must agree, per client:

- the hook's ``mechanism_record``, taken where the mechanism acts: for dp_sgd the rate handed to the
  Poisson sampler, the z handed to the noise and the loop iterations run, per local training; for
  dp_client the noise std added / C, the C clipped to and the adjacency, per release;
- this test's own arithmetic from each client's training set (its length), the config and the
  schedule: q = B / |D_n|, E·⌈1/q⌉ steps per local training, the rounds the client joins, z as
  configured or calibrated for those (dp_sgd: its ε at the client's own q and steps within Opacus'
  search tolerance below the target), sensitivity 2C (replace) or C (add_remove);
- the accountant's history, and the ε the hook reports, which must equal a fresh Opacus accountant's
  ε from the record (and, client level, lie in [exact μ-GDP ε, 1.15 × exact]).

The runs: 3 Dirichlet clients of unequal sizes (128, 311, 442; all > B), 2 of 3 per round over 3
rounds, so clients train and release different numbers of times (2, 1, 3; seed 0).
``test_accounting_mutations_are_caught`` breaks the accounting the ways the review did and asserts
that the check flags each.
"""
import json
import math

import pytest
from conftest import tiny_config
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from defenses.accounting import ClientAccountants
from pfedpg.gdp import gdp_epsilon
from pfedpg.run import Trainer

B, EPOCHS, ROUNDS, PER_ROUND, CLIENTS = 32, 1, 3, 2, 3
SGD_DELTA, CLIENT_DELTA, CLIP = 1e-4, 1e-5, 0.5
SGD_RUNS = {"z": {"noise_multiplier": 1.1}, "target": {"target_epsilon": 3.0}}
CLIENT_RUNS = {f"{adj}-{how}": {"adjacency": adj, **opts} for adj in ("replace", "add_remove")
               for how, opts in (("z", {"noise_multiplier": 1.3}), ("target", {"target_epsilon": 4.0}))}


def _spec(name: str, run: str) -> dict:
    if name == "dp_sgd":
        return {"name": "dp_sgd", "clip": 1.0, "delta": SGD_DELTA, **SGD_RUNS[run]}
    return {"name": "dp_client", "clip": CLIP, "delta": CLIENT_DELTA, **CLIENT_RUNS[run]}


def _run(tmp_path, spec: dict):
    import defenses  # noqa: F401  (registers the hooks)

    cfg = tiny_config(rounds=ROUNDS, clients_per_round=PER_ROUND, checkpoint_every=0, hooks=[spec],
                      **{"data.partition": "dirichlet", "data.num_clients": CLIENTS, "data.max_train_per_client": None,
                         "client.batch_size": B, "client.local_epochs": EPOCHS})
    trainer = Trainer(cfg, run_dir=tmp_path / spec["name"])
    summary = trainer.run()
    return trainer, summary


def _hook(trainer, name):
    return next(h for h in trainer.hooks.hooks if h.name == name)


def _rounds_of(trainer, n: int) -> list[int]:
    return [r for r, who in enumerate(trainer.ctx.schedule, start=1) if n in who]


def _as_history(entries) -> list[tuple]:
    """(z, q, steps) entries as Opacus' step() keeps them: consecutive equal (z, q) merged."""
    out = []
    for z, q, k in entries:
        if out and out[-1][:2] == (z, q):
            out[-1] = (z, q, out[-1][2] + k)
        else:
            out.append((z, q, k))
    return out


def _same_history(a, b) -> bool:
    return len(a) == len(b) and all(math.isclose(x[0], y[0], rel_tol=1e-12) and x[1:] == y[1:] for x, y in zip(a, b))


def _epsilon(history, delta: float) -> float:
    if not history:
        return 0.0
    acc = RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def _preconditions(trainer) -> None:
    """The runs must be able to tell a per-client q and step count from a shared one."""
    sizes = [len(trainer.ctx.train_data[n][1]) for n in range(CLIENTS)]
    joins = [len(_rounds_of(trainer, n)) for n in range(CLIENTS)]
    assert len(set(sizes)) > 1 and min(sizes) > B and len(set(joins)) > 1 and min(joins) >= 1, (sizes, joins)


def _z_as_planned(spec, z: float, q: float, steps: int) -> bool:
    """z as configured, or calibrated for this client's own q and steps: Opacus' search returns a z
    whose ε lies in [target − tolerance, target] (one ε evaluation here, not a second ~1 s search)."""
    if "noise_multiplier" in spec:
        return z == spec["noise_multiplier"]
    target = spec["target_epsilon"]
    return target - 0.005 <= _epsilon([(z, q, steps)], SGD_DELTA) <= target


def check_dp_sgd(trainer, summary, spec) -> list[str]:
    """Violations, each '<what>: client n ...', of dp_sgd's record, accountant history and ε."""
    hook, problems = _hook(trainer, "dp_sgd"), []
    reported = summary["hook_results"]["dp_sgd"]["epsilon_per_client"]
    for n in range(CLIENTS):
        size = len(trainer.ctx.train_data[n][1])
        q = B / size
        steps = EPOCHS * math.ceil(1 / q)
        rounds = _rounds_of(trainer, n)
        record = hook.mechanism_record.get(n, [])
        if [e.round for e in record] != rounds:
            problems.append(f"rounds: client {n} trained in {[e.round for e in record]}, schedule: {rounds}")
        for e in record:
            if e.sample_rate != q:
                problems.append(f"sample_rate: client {n} round {e.round} at {e.sample_rate}, B/|D_n| = {q}")
            if e.steps != steps:
                problems.append(f"steps: client {n} round {e.round} ran {e.steps} steps, E·⌈1/q⌉ = {steps}")
            if not _z_as_planned(spec, e.noise_multiplier, q, len(rounds) * steps):
                problems.append(f"noise: client {n} round {e.round} used z = {e.noise_multiplier}, not the z "
                                f"planned for q = {q} over {len(rounds) * steps} steps")
        from_record = _as_history((e.noise_multiplier, e.sample_rate, e.steps) for e in record)
        acc = hook.accountants._acc.get(n)
        history = [tuple(h) for h in acc.history] if acc is not None else []
        if not _same_history(history, from_record):
            problems.append(f"history: client {n} accountant {history}, mechanism {from_record}")
        eps = _epsilon(from_record, SGD_DELTA)
        if not math.isclose(eps, reported[n], rel_tol=1e-9):
            problems.append(f"epsilon: client {n} reported {reported[n]:.4f}, the record gives {eps:.4f}")
    return problems


def check_dp_client(trainer, summary, spec) -> list[str]:
    """Violations of dp_client's record, accountant history, ε and its closed form (DESIGN §5)."""
    hook, problems = _hook(trainer, "dp_client"), []
    reported = summary["hook_results"]["dp_client"]["epsilon_per_client"]
    adjacency, clip = spec["adjacency"], spec["clip"]
    units = {"replace": 2.0, "add_remove": 1.0}  # sensitivity in units of C, stated here independently
    releases = {n: _rounds_of(trainer, n) for n in range(CLIENTS)}
    z = spec.get("noise_multiplier")
    if z is None:  # calibrated for the most releases any client makes: z = unit · sensitivity / C
        z = units[adjacency] * get_noise_multiplier(
            target_epsilon=spec["target_epsilon"], target_delta=CLIENT_DELTA, sample_rate=1.0,
            steps=max(len(r) for r in releases.values()), accountant="rdp", epsilon_tolerance=0.005)
    for n, rounds in releases.items():
        record = hook.mechanism_record.get(n, [])
        if [e.round for e in record] != rounds:
            problems.append(f"rounds: client {n} released in {[e.round for e in record]}, schedule: {rounds}")
        for e in record:
            if not math.isclose(e.noise_multiplier, z, rel_tol=1e-9):
                problems.append(f"noise: client {n} round {e.round} added std {e.noise_multiplier}·C, z = {z}")
            if e.clip != clip or e.adjacency != adjacency:
                problems.append(f"clip: client {n} round {e.round} clipped to {e.clip} under {e.adjacency}")
        # per-unit multiplier = noise std / sensitivity = z·C / (units·C), from what the release used
        from_record = _as_history((e.noise_multiplier * e.clip / (units[e.adjacency] * e.clip), 1.0, 1)
                                  for e in record)
        acc = hook.accountants._acc.get(n)
        history = [tuple(h) for h in acc.history] if acc is not None else []
        if not _same_history(history, from_record):
            problems.append(f"history: client {n} accountant {history}, mechanism {from_record}")
        eps = _epsilon(from_record, CLIENT_DELTA)
        if not math.isclose(eps, reported[n], rel_tol=1e-9):
            problems.append(f"epsilon: client {n} reported {reported[n]:.4f}, the record gives {eps:.4f}")
        used = record[0].noise_multiplier if record else z  # the noise the releases had
        exact = gdp_epsilon(units[adjacency] * math.sqrt(len(rounds)) / used, CLIENT_DELTA)
        if not exact * (1 - 1e-9) <= reported[n] <= 1.15 * exact:
            problems.append(f"closed_form: client {n} reported {reported[n]:.4f}, exact μ-GDP {exact:.4f}")
    return problems


CHECKS = {"dp_sgd": check_dp_sgd, "dp_client": check_dp_client}


@pytest.mark.parametrize("name, run", [("dp_sgd", r) for r in SGD_RUNS] + [("dp_client", r) for r in CLIENT_RUNS])
def test_accountant_history_matches_the_mechanism_record(tmp_path, name, run):
    spec = _spec(name, run)
    trainer, summary = _run(tmp_path, spec)
    _preconditions(trainer)
    assert CHECKS[name](trainer, summary, spec) == []
    # Checkpoints (and diverged.json's JSON) and the Flower client's state carry the record; a checkpoint
    # from before the record loads with an empty one.
    hook = _hook(trainer, name)
    state = json.loads(json.dumps(hook.state_dict()))
    clone = type(hook)(**{k: v for k, v in spec.items() if k != "name"})
    clone.load_state_dict(state)
    assert clone.mechanism_record == hook.mechanism_record
    clone.load_state_dict({k: v for k, v in state.items() if k != "mechanism_record"})
    assert clone.mechanism_record == {}
    client = next(iter(hook.mechanism_record))
    clone.merge_client_state(client, hook.client_state(client))
    assert clone.mechanism_record == {client: hook.mechanism_record[client]}
    clone.merge_client_state(client, {"accountant": {"history": [], "unbounded": False}})
    assert clone.mechanism_record == {}


# ------------------------------------------------------------------------------------------------
# The accounting broken as the review broke it: what the accountant (and calibration) is told changes,
# what the sampler and the noise do does not. The check must flag each.

def _global_rate(monkeypatch):
    """q = B / Σ_n |D_n| (all clients' records) in calibration and accountant; the sampler keeps B / |D_n|."""
    import defenses.dp_sgd as mod

    rate, setup, calibrate, step = {}, mod.RecordLevelDPSGD.setup, mod.calibrate_noise, ClientAccountants.step

    def global_setup(self, ctx):
        rate["q"] = ctx.config.client.batch_size / sum(ctx.train_sizes)
        setup(self, ctx)

    monkeypatch.setattr(mod.RecordLevelDPSGD, "setup", global_setup)
    monkeypatch.setattr(mod, "calibrate_noise", lambda **kw: calibrate(**{**kw, "sample_rate": rate["q"]}))
    monkeypatch.setattr(ClientAccountants, "step", lambda self, client, *, noise_multiplier, sample_rate:
                        step(self, client, noise_multiplier=noise_multiplier, sample_rate=rate["q"]))


def _one_step_fewer(monkeypatch):
    """Calibration plans, and the accountant counts, one step fewer per local training than the loop runs."""
    import defenses.dp_sgd as mod

    cls, skip, step = mod.RecordLevelDPSGD, {}, ClientAccountants.step
    setup, train = cls.setup, cls.local_training

    def short_setup(self, ctx):
        self.steps = lambda size: cls.steps(self, size) - 1
        try:
            setup(self, ctx)
        finally:
            del self.steps

    def marked_training(self, ctx, job, call_next):
        skip["next"] = True
        return train(self, ctx, job, call_next)

    def skipping_step(self, client, **kw):
        if skip.pop("next", False):
            return
        step(self, client, **kw)

    monkeypatch.setattr(cls, "setup", short_setup)
    monkeypatch.setattr(cls, "local_training", marked_training)
    monkeypatch.setattr(ClientAccountants, "step", skipping_step)


def _replace_accounted_as_c(monkeypatch):
    """The accountant's per-unit multiplier is z, as if replace had sensitivity C (it is 2C: z/2)."""
    from defenses.dp_client import ClientLevelDP

    monkeypatch.setattr(ClientLevelDP, "accounting_multiplier", property(lambda self: self.noise_multiplier))


def _replace_sensitivity_c(monkeypatch):
    """Replace adjacency given sensitivity C in calibration and accountant alike."""
    import defenses.dp_client as mod

    monkeypatch.setitem(mod.ADJACENCIES, "replace", 1.0)


@pytest.mark.parametrize("mutation, name, run, flagged", [
    (_global_rate, "dp_sgd", "z", {"history", "epsilon"}),
    (_global_rate, "dp_sgd", "target", {"history", "epsilon", "noise"}),
    (_one_step_fewer, "dp_sgd", "target", {"history", "epsilon", "noise"}),
    # now refused at the first release: the Release's accounting multiplier is not z / sensitivity
    (_replace_accounted_as_c, "dp_client", "replace-z", "refused"),
    (_replace_sensitivity_c, "dp_client", "replace-target", {"history", "epsilon", "noise", "closed_form"}),
], ids=["dp_sgd-global_rate-z", "dp_sgd-global_rate-target", "dp_sgd-one_step_fewer-target",
        "dp_client-replace_accounted_as_c-z", "dp_client-replace_sensitivity_c-target"])
def test_accounting_mutations_are_caught(tmp_path, monkeypatch, mutation, name, run, flagged):
    mutation(monkeypatch)
    spec = _spec(name, run)
    if flagged == "refused":
        with pytest.raises(ValueError, match="converts its noise to the accountant's unit wrongly"):
            _run(tmp_path, spec)
        return
    trainer, summary = _run(tmp_path, spec)
    problems = CHECKS[name](trainer, summary, spec)
    kinds = {p.split(":")[0] for p in problems}
    assert flagged <= kinds, problems
    # The record still says what the sampler and the loop did: it is not fed from the accountant's path.
    assert not kinds & {"sample_rate", "steps", "rounds", "clip"}, problems
