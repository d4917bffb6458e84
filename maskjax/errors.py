"""The bottom layer: the one base of every error maskjax reports to a user, and its exit status.

The CLI prints any :class:`MaskjaxError` as one line naming the offending thing and exits with its
``exit_status`` (2: bad input). Other statuses (preemption, non-finite steps, a lost peer) are listed
in :mod:`maskjax.faults`; anything that is not a ``MaskjaxError`` is a bug and exits 1.
"""
from __future__ import annotations


class MaskjaxError(Exception):
    """Bad input or a run that cannot go on; ``str(err)`` names the key, file, flag or dataset."""

    exit_status = 2
    hard_exit = False  # leave without the interpreter's teardown (a dead peer, failed writer threads)


class ConfigError(MaskjaxError, ValueError):
    """A bad config value; ``str(err)`` names the key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config.{key}: {message}")
        self.key, self.message = key, message


class UsageError(MaskjaxError, ValueError):
    """A bad command-line flag."""
