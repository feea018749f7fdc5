"""Errors a user can cause and fix: each prints as one line, never as a traceback."""


class ScalaxError(Exception):
    """A mistake in a config, flag, path or checkpoint; the message says what is allowed."""

    exit_code = 2
    label = "error"  # how the CLI introduces the message


class ConfigError(ScalaxError):
    """A bad configuration value. `key` is the dotted config key (e.g. `model.n_heads`)."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")
