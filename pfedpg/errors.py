"""Errors the toolkit raises on bad input; each message names the fix."""


class ConfigError(ValueError):
    """A configuration value is unknown, malformed or impossible. The message says what to change."""


class DataError(ValueError):
    """A data file is missing or corrupt, or a partition cannot be satisfied."""


class NonFiniteDeltaError(RuntimeError):
    """A client sent NaN/Inf; raised instead of silently corrupting the server state."""


class ClientFailure(RuntimeError):
    """A client of a Flower run failed and ``flower.on_client_failure`` is ``fail``."""
