"""The one exception family for bad user input; the CLI prints its message as a single line and exits 2."""


class UserInputError(ValueError):
    """A setting, file or row the user must fix; the message names it and says how."""


class ConfigError(UserInputError):
    """An invalid configuration value (names the config key, e.g. `model.beta`)."""
