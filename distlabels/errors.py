"""User-facing errors.

Every error a user can cause (a missing file, a bad expression, a malformed model) is raised as a
:class:`DistlabelsError` whose message is one complete sentence. The CLI prints it on one line and
exits non-zero without a traceback; library users catch it like any exception.
"""


class DistlabelsError(Exception):
    """An error caused by input or configuration, explained in one sentence."""


class ModelFormatError(DistlabelsError):
    """A model file or directory that cannot be read as a distlabels emulator."""


class UnsafePickleError(ModelFormatError):
    """A pickle that asks for a global outside the allow-list."""


class StoreError(DistlabelsError):
    """A spectra store or catalog that is missing or malformed."""


class QueryError(DistlabelsError):
    """A query expression that cannot be evaluated (unknown column, bad syntax, bad cone)."""
