"""The project's own error types. The CLI prints these as one clear line; anything else is a bug."""


class OasisVQError(Exception):
    """Base class: a problem the user can fix (bad path, bad file, bad option)."""


class DataError(OasisVQError):
    """A data source is missing, unreadable or inconsistent. The message names the file."""


class ConfigError(OasisVQError):
    """A configuration value or command-line option is out of range or unknown."""


class CheckpointError(OasisVQError):
    """A checkpoint is missing, unsafe, corrupt or does not fit the model it is loaded into."""


class TrainingError(OasisVQError):
    """Training cannot continue (for example the loss became NaN)."""
