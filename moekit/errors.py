"""Every error moekit raises on purpose.

Each class subclasses a builtin so callers can catch what they already know
(``ValueError``, ``FileExistsError`` ...). Messages are one line: the problem,
then the fix. Libraries raise; only ``moekit.cli`` turns these into exit codes.
"""


class MoekitError(Exception):
    """Base class: a problem the user can fix. The CLI prints it as one line."""


class ConfigError(MoekitError, ValueError):
    """A setting is invalid (names the field, the value and the fix)."""


class InputError(MoekitError, ValueError):
    """An input (model folder, data file, shard) is missing or malformed."""


class UnsupportedModelError(InputError):
    """The source model is not an architecture moekit can convert exactly."""


class OutputExistsError(MoekitError, FileExistsError):
    """The output folder exists and ``force`` was not given."""


class MissingDependencyError(MoekitError, ImportError):
    """An optional package is needed for this feature."""


class HubError(MoekitError, RuntimeError):
    """The Hugging Face Hub cannot be reached or refused the request."""
