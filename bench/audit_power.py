"""Can the shipped one-run audits fail? configs/audit_falsifiable.yaml as shipped, and with each
mechanism deliberately broken (DESIGN §6): dp_client's noise × 0.57 (ε 8 → about 16), dp_client
clipping after its noise, DP-SGD's noise × 0.5. Runs the audit command in this process (the breaks
are patched into the mechanisms' classes), pooled over the seeds given, and prints per mechanism the
headline bound, its cap, the claim, the accountant's ε and the verdicts, Steinke et al.'s bound beside.

    python bench/audit_power.py --seeds 0 1 2      # ~6 min on 2 cores with the backbone cached
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def audit(seeds: list[int], mechanism: str | None, out: Path) -> dict:
    """The shipped file with ``seeds`` (and only ``mechanism``'s cell when given); its pooled groups."""
    from evaluations.cli import main

    tree = yaml.safe_load((ROOT / "configs" / "audit_falsifiable.yaml").read_text())
    tree["base_config"] = str(ROOT / "configs" / tree["base_config"])
    tree["audit"].update(seeds=seeds, out_dir=str(out))
    if mechanism is not None:
        tree["audit"]["mechanisms"] = {mechanism: tree["audit"]["mechanisms"][mechanism]}
        tree["audit"].pop("client_canaries" if mechanism == "dp_sgd" else "gradient_canaries")
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    if main(["audit", "--config", str(path), "--jobs", "1"]) != 0:
        raise SystemExit(f"the audit of {path} failed")
    from pfedpg import jsonio

    return jsonio.read(out / "audit.json")["groups"]  # (strict JSON: "Infinity" read back as a float)


def broken(kind: str):
    """Patch one break into its mechanism's class; returns the undo."""
    from defenses.dp_client import ClientLevelDP, clip_by_norm
    from defenses.dp_sgd import RecordLevelDPSGD
    from pfedpg.seeding import normal_like

    if kind == "dp_sgd noise x0.5":
        original = RecordLevelDPSGD.add_noise
        RecordLevelDPSGD.add_noise = lambda self, summed, z, g: original(self, summed, 0.5 * z, g)
        return lambda: setattr(RecordLevelDPSGD, "add_noise", original)
    original = ClientLevelDP.privatize

    def privatize(self, delta, generator):
        noise = normal_like(delta, generator) * (self.noise_multiplier * self.clip)
        if kind == "dp_client noise x0.57":
            return clip_by_norm(delta, self.clip) + 0.57 * noise
        return clip_by_norm(delta + noise, self.clip)  # clipping after the noise

    ClientLevelDP.privatize = privatize
    return lambda: setattr(ClientLevelDP, "privatize", original)


def row(name: str, res: dict) -> str:
    s = res["bounds"]["steinke"] if "bounds" in res else res["releases"]["bounds"]["steinke"]
    per_seed = ", ".join(f"{v:.2f}" for v in res["epsilon_lb_per_seed"])
    return (f"| {name} | {res['epsilon_lb']:.2f} | {res['epsilon_cap']:.1f} | {res['claimed_epsilon']:.2f} | "
            f"{res.get('accountant_epsilon', res['claimed_epsilon']):.2f} | {res['can_fail']} | {res['violation']} | "
            f"{per_seed} | {s['epsilon_lb']:.2f} (cap {s['epsilon_cap']:.2f}) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    lines = ["| mechanism | ε_lb (pooled) | cap | claim | accountant ε | can fail | violation | ε_lb per seed | "
             "Steinke et al. |", "|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        groups = audit(args.seeds, None, Path(tmp) / "shipped")
        lines.append(row("dp_client (releases), as shipped", groups["dp_client-eps8"]["probes"]["client_canary"]))
        lines.append(row("dp_sgd (gradient canaries), as shipped", groups["dp_sgd-eps8"]["probes"]["gradient_canary"]))
        for kind, mech in (("dp_client noise x0.57", "dp_client"), ("dp_client clip after noise", "dp_client"),
                           ("dp_sgd noise x0.5", "dp_sgd")):
            undo = broken(kind)
            try:
                g = audit(args.seeds, mech, Path(tmp) / kind.replace(" ", "_"))
            finally:
                undo()
            key = "client_canary" if mech == "dp_client" else "gradient_canary"
            lines.append(row(kind, g[f"{mech}-eps8"]["probes"][key]))
    print(f"seeds {args.seeds}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
