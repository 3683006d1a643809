"""The one exception type for mistakes a user can fix: a bad setting, bad data, a checkpoint that does not fit.

``plan``'s command prints these as one line naming the key, the bad value and what would be valid, without a
traceback; anything else is a bug and keeps its traceback. ``ConfigError`` is a ``ValueError`` so that code
calling the library directly can catch it as one.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A mistake in the run's settings, data or checkpoint, explained in the message."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)
