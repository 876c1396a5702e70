"""HMAC-SHA256 under one key, and a helper process that computes digests for a bulk load.

This module imports only the standard library: :class:`DigestWorker` runs it as a script
in a new interpreter (``python -I``, which puts no script directory on ``sys.path``), so
the helper starts in a few tens of milliseconds and imports nothing of this package,
pandas or SQLAlchemy.

Why a process: the pseudonyms of a 1M-procedure file are about a million HMACs, 3-4 s of
this process's CPU (the largest single cost of a bulk load's client side, issue 10), and
CPython's ``hashlib`` keeps the GIL for short messages, so a thread cannot take them. The
loader sends one chunk's distinct messages, reads and validates the next chunk meanwhile,
and then collects the digests (``load._stage_chunks``); on two cores the hashing runs
beside the reading. The digests are those of :meth:`KeyedDigest.hexdigests`, the same
code in either process.

The channel is a pair of pipes between this package's two processes (nothing else writes
to them): the parent sends the key, then requests, each a pickled list of lists of
messages; the helper answers each with a pickled ``("ok", digests)`` or ``("error",
None)`` (a message it could not encode: the parent then hashes that request itself and
raises the same error it always raised). The helper's stdout is moved to stderr first, so
nothing else can write to the channel; the key is never written anywhere else.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys

_BLOCK = 64  # SHA-256 block size in bytes (RFC 2104's B)


class KeyedDigest:
    """HMAC-SHA256 under one key, with the inner and outer keyed states computed once."""

    def __init__(self, key: bytes):
        # RFC 2104: a key longer than the block is hashed first, then zero-padded.
        block = hashlib.sha256(key).digest() if len(key) > _BLOCK else key
        block = block.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(byte ^ 0x36 for byte in block))
        self._outer = hashlib.sha256(bytes(byte ^ 0x5C for byte in block))

    def hexdigest(self, message: bytes) -> str:
        """Return the hex HMAC-SHA256 of ``message``."""
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()

    def hexdigests(self, messages: list[str]) -> list[str]:
        """Return :meth:`hexdigest` of each message's UTF-8 bytes, in order.

        The same digests as one :meth:`hexdigest` call per message, with the per-call
        attribute look-ups hoisted out of the loop (one message per distinct reference of a
        1M-row file).
        """
        inner_copy, outer_copy = self._inner.copy, self._outer.copy
        out = []
        append = out.append
        for message in messages:
            inner = inner_copy()
            inner.update(message.encode())
            outer = outer_copy()
            outer.update(inner.digest())
            append(outer.hexdigest())
        return out


class DigestWorker:
    """A helper process computing :meth:`KeyedDigest.hexdigests` for one key.

    One request at a time: :meth:`send` a request, do other work, :meth:`receive` its
    digests, then send the next. Neither side writes while the other waits to write, so
    the pipes cannot deadlock. Any failure of the helper (it could not start, died, sent
    something unreadable, could not encode a message) makes :meth:`receive` return None
    and the worker unusable; the caller then hashes in its own process.
    """

    def __init__(self, key: bytes):
        self._process: subprocess.Popen | None = None
        self._sent = False
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
            )
            pickle.dump(key, self._process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._process.stdin.flush()
        except (OSError, ValueError):
            self.close()

    @property
    def usable(self) -> bool:
        """Whether requests go to the helper (False once it failed or was closed)."""
        return self._process is not None

    def send(self, request: list[list[str]]) -> bool:
        """Send one request (lists of messages); False when the helper cannot take it."""
        if self._process is None or self._sent:
            return False
        try:
            pickle.dump(request, self._process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._process.stdin.flush()
        except (OSError, ValueError, pickle.PicklingError):
            self.close()
            return False
        self._sent = True
        return True

    def receive(self) -> list[list[str]] | None:
        """The digests of the request sent last, list by list; None when the helper failed."""
        if self._process is None or not self._sent:
            return None
        self._sent = False
        try:
            status, digests = pickle.load(self._process.stdout)
        except (OSError, EOFError, ValueError, pickle.UnpicklingError):
            status, digests = "error", None
        if status != "ok":
            self.close()
            return None
        return digests

    def close(self) -> None:
        """Stop the helper (end of input), killing it if it does not leave at once."""
        process, self._process = self._process, None
        if process is None:
            return
        for stream in (process.stdin, process.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _serve() -> None:
    """The helper's loop: read the key, then answer requests until the input ends."""
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but answers may reach the channel
    digest = KeyedDigest(pickle.load(source))
    while True:
        try:
            request = pickle.load(source)
        except EOFError:
            return
        try:
            answer = ("ok", [digest.hexdigests(messages) for messages in request])
        except Exception:  # noqa: BLE001 -- e.g. a lone surrogate: the parent hashes it, and raises
            answer = ("error", None)
        pickle.dump(answer, sink, protocol=pickle.HIGHEST_PROTOCOL)
        sink.flush()


if __name__ == "__main__":
    _serve()
