"""User-facing errors: the CLI prints their message and exits non-zero without a traceback."""


class PolyalignError(Exception):
    """Base class of errors whose message is meant for the user."""

    exit_code = 1


class ConfigError(PolyalignError):
    """A wrong config key or value (exit code 2)."""

    exit_code = 2


class DataError(PolyalignError):
    """Unusable input data: too many bad rows, missing manifest, empty dataset."""


class TrainingError(PolyalignError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class Interrupted(PolyalignError):
    """The user interrupted the run (Ctrl-C); exit code 130 as shells expect."""

    exit_code = 130
