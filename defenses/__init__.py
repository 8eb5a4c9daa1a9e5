"""DP mechanisms, accountants and robust aggregation, as hooks registered by name (DESIGN §4, §5, §7).

Importing this package registers its hooks; it imports ``pfedpg`` and never ``attacks``.
"""
from defenses import dp_client, dp_sgd, nonfinite, robust  # noqa: F401  (register their hooks)
