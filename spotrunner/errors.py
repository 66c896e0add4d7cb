"""Errors that end a command with a one-line message and a defined exit code."""

from spotrunner import exitcodes


class SpotrunnerError(Exception):
    """An error whose message is meant for the operator, one line, no traceback."""

    exit_code = exitcodes.FAILURE


class ConfigError(SpotrunnerError):
    """A setting is wrong; the message names the setting and the fix."""

    exit_code = exitcodes.CONFIG


class FencedError(SpotrunnerError):
    """Another live writer holds the run; the message names it and how to take over."""

    exit_code = exitcodes.FENCED


class StoreError(SpotrunnerError):
    """The store failed in a way retries did not cure."""


class NotFound(StoreError):
    """The key does not exist in the store."""


class PreconditionFailed(StoreError):
    """A conditional write lost: the object exists, or changed since it was read."""


class CorruptCheckpoint(StoreError):
    """A checkpoint failed verification (checksum, size or decoding)."""
