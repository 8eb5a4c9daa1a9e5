"""Malicious clients and leakage probes, as hooks registered by name (DESIGN §6, §7).

Importing this package registers its hooks; it imports ``pfedpg`` and never ``defenses``.
``attacks.epsilon_bounds`` holds the multi-trial Clopper–Pearson and Steinke et al.'s one-run bounds,
``attacks.one_run_bounds`` the one-run bounds that can reach a claim (Xiang et al., Mahloujifar et al.,
a model-based Gaussian bound) over the families of ``attacks.tradeoff``.
"""
from attacks import (
    client_canary,  # noqa: F401  (registers the client_canary_audit hook)
    gradient_canary,  # noqa: F401  (registers the gradient_canary_audit hook)
    leakage,  # noqa: F401  (registers the leakage_audit hook)
    malicious,  # noqa: F401  (registers the malicious-client hooks)
)
