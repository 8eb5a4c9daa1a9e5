"""Malicious clients and leakage probes, as hooks registered by name (DESIGN §6, §7).

Importing this package registers its hooks; it imports ``pfedpg`` and never ``defenses``.
``attacks.epsilon_bounds`` holds the empirical-ε machinery (Clopper–Pearson and Gaussian-DP lower bounds).
"""
from attacks import malicious  # noqa: F401  (registers the malicious-client hooks)
from attacks import leakage  # noqa: F401  (registers the leakage_audit hook)
from attacks import client_canary  # noqa: F401  (registers the client_canary_audit hook)
