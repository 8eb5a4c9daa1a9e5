"""Fill the hook registry: the core never names an attack or a defense (DESIGN §0)."""


def load_plugins() -> None:
    import attacks  # noqa: F401
    import defenses  # noqa: F401
