"""Errors that carry a message a user can act on.

Every error that the CLI turns into a one-line message (and a non-zero exit) derives from
:class:`MoonError`. Library code raises these for bad user input or bad data; bugs stay ordinary
exceptions so that they keep their tracebacks.
"""

from __future__ import annotations


class MoonError(Exception):
    """Base class of errors caused by the user's input, data or environment."""


class ConfigError(MoonError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class DataError(MoonError):
    """A data file or record is malformed (the message names the file/row and the reason)."""


class TrainingError(MoonError):
    """Training cannot go on (the loss, the gradients or the weights are no longer finite); the message
    names the step and what was kept."""
