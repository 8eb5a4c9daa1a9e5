"""pFedPG (Yang, Wang & Wang, ICCV 2023): client-specific prompt generation for a frozen ViT.

The core of pfedpg-eval: data, models, the method's server and client, the hook interface and the
in-process runner. It imports none of ``attacks``, ``defenses`` or ``evaluations`` (DESIGN §0).
"""

__version__ = "0.1.0"
