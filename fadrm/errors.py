"""User-facing errors.

Anything a user can cause (bad config, bad data, missing inputs, a diverging loss) raises a
:class:`FadrmError` subclass with a message that names the offending key, path or class.
The adapters (CLI, DVC stages, Prefect tasks) print the message and exit non-zero instead
of showing a traceback.
"""

from __future__ import annotations


class FadrmError(Exception):
    """Base class for errors caused by input, not by a bug."""

    exit_code = 2


class ConfigError(FadrmError):
    """Invalid parameters: unknown keys, wrong types, inconsistent values."""


class DataError(FadrmError):
    """A dataset that cannot be used: missing paths, empty classes, unreadable images."""


class UnsafeArchiveError(DataError):
    """An archive member would be written outside its target folder."""


class MissingInputError(FadrmError):
    """A stage was run before the stage it depends on produced its outputs."""


class WeightsError(FadrmError):
    """Teacher/student weights that cannot be loaded."""


class DivergenceError(FadrmError):
    """A loss became NaN or infinite; finished work is kept, the stage output is not written."""


class TrackingError(FadrmError):
    """The experiment tracker cannot be reached or refused a request."""
