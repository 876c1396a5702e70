"""Errors that reach the user as one clear line and a meaningful exit code.

Exit codes used by the ``kyphowatch`` command:

* 0 - everything processed (quarantined rows are a normal outcome)
* 1 - an unexpected internal error (a bug: the traceback is logged)
* 2 - an input was rejected (bad file, bad argument); the message says why
* 3 - configuration is missing or invalid
* 4 - the warehouse or another external system could not be reached, or the warehouse
  failed mid-command (lost connection, shutdown, disk full); rerunning is safe
"""

from __future__ import annotations


class KyphowatchError(Exception):
    """Base class for errors shown to the user without a traceback."""

    exit_code = 1


class InputRejected(KyphowatchError):
    """A file or argument was rejected; nothing from it was stored."""

    exit_code = 2


class ConfigError(KyphowatchError):
    """Configuration is missing or invalid."""

    exit_code = 3


class ExternalSystemError(KyphowatchError):
    """The warehouse, mail server or webhook could not be reached."""

    exit_code = 4
