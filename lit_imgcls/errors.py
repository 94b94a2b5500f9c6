"""Errors for mistakes a user can fix; the CLI prints them without a traceback."""


class UserError(Exception):
    """A mistake in the config, the data or the environment that the message explains how to fix."""


class DatasetNotFoundError(UserError):
    """The dataset is neither on disk nor downloadable."""


class ConfigError(UserError):
    """Options that contradict each other or the data."""
