"""The one exception type for bad input: caught at the entry points and shown as one paragraph."""


class ConfigError(ValueError):
    """A setting or input file is invalid; the message names the setting and what is allowed."""
