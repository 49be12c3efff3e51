"""What the backends raise when they cannot run here (not a fault of the data or of fastload)."""


class BackendUnavailable(ImportError):
    """A backend's own requirement is missing here (a Python extra, fastload's C helpers): one line
    naming it and the remedy."""
