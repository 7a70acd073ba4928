"""The project's own exceptions: every user-facing failure is one of these, with a message that names
the file and the problem. The CLI prints them without a traceback."""


class DestsegError(Exception):
    """Base class of every error the library raises on purpose."""


class ImageError(DestsegError):
    """An image or mask file cannot be used (unreadable, corrupt, too large, wrong kind)."""


class DatasetError(DestsegError):
    """A dataset folder does not have the expected layout or content."""


class CheckpointError(DestsegError):
    """A checkpoint is missing, corrupt, unsafe or from an incompatible model or version."""


class MetricError(DestsegError):
    """Metric inputs are invalid (shape mismatch, NaN, no positives...)."""
