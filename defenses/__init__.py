"""DP mechanisms, accountants and robust aggregation, as hooks registered by name (DESIGN §4, §5, §7).

Importing this package registers its hooks; it imports ``pfedpg`` and never ``attacks``.
"""
from defenses import nonfinite  # noqa: F401  (registers `reject_nonfinite`)
