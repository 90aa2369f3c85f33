"""Exceptions for problems in the user's input, reported as one line with exit code 2."""


class UserError(Exception):
    """Bad input from the user (config, files, data, checkpoints).

    The entry points print ``error: <message>`` on one line and exit with code 2 instead of a traceback,
    so the message must name the offending key, file or value and what was expected.
    """

    exit_code = 2


class ConfigError(UserError):
    """A configuration file, key or value is wrong."""


class DataError(UserError):
    """A dataset folder, split file, file name, annotation or image is missing or malformed."""


class CheckpointError(UserError):
    """A checkpoint or pretrained-weights file is missing, unreadable or does not fit the model."""
