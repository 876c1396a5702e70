"""A local SMTP server that keeps every message it receives as an ``.eml`` file.

The demo and the tests need a real mail server to prove that alert e-mails go out
exactly once, without sending anything to the outside world. This sink speaks real
SMTP (aiosmtpd), accepts every message and writes it, byte for byte, into a directory.
It de-duplicates nothing on purpose: a message delivered twice shows up twice, so a
test that counts files really measures the sender.

Run it stand-alone with ``python -m pipelines.mailsink --dir var/mail --port 8025``.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import itertools
import socket
import threading
import time
import uuid
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.controller import Controller

_counter = itertools.count()
_counter_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class _SaveHandler:
    """aiosmtpd handler that writes each accepted message to ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 - aiosmtpd hook name
        with _counter_lock:
            sequence = next(_counter)
        name = f"{time.time_ns()}-{sequence:06d}-{uuid.uuid4().hex[:8]}.eml"
        temporary = self.directory / f".{name}.tmp"
        data = envelope.original_content or envelope.content
        if isinstance(data, str):
            data = data.encode("utf-8")
        temporary.write_bytes(data)
        # rename so a reader never sees half a message
        temporary.replace(self.directory / name)
        return "250 Message accepted for delivery"


class MailSink:
    """A running SMTP sink on ``host:port`` storing messages in ``directory``.

    Use as a context manager, or call :meth:`start` / :meth:`stop`. ``port=0`` picks a
    free port; :attr:`url` is the ``smtp://`` URL to put in ``Settings.smtp_url``.
    """

    def __init__(self, directory: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.directory = Path(directory)
        self.host = host
        self.port = port or free_port(host)
        self._controller: Controller | None = None

    @property
    def url(self) -> str:
        """Return the ``smtp://host:port`` URL of this sink."""
        return f"smtp://{self.host}:{self.port}"

    def start(self) -> MailSink:
        """Start serving in a background thread; return self."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._controller = Controller(
            _SaveHandler(self.directory), hostname=self.host, port=self.port
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        """Stop serving (messages already stored stay on disk)."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> MailSink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def messages(self) -> list[EmailMessage]:
        """Return every message received so far, oldest first."""
        return read_messages(self.directory)


def message_files(directory: Path) -> list[Path]:
    """Return the stored ``.eml`` files in arrival order."""
    directory = Path(directory)
    if not directory.exists():
        return []
    return sorted(path for path in directory.glob("*.eml") if not path.name.startswith("."))


def read_messages(directory: Path) -> list[EmailMessage]:
    """Parse every stored message in ``directory``, oldest first."""
    return [
        email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        for path in message_files(directory)
    ]


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted."""
    parser = argparse.ArgumentParser(description="Local SMTP sink that stores .eml files.")
    parser.add_argument("--dir", default="var/mail", type=Path, help="where to store messages")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", default=8025, type=int)
    args = parser.parse_args(argv)
    sink = MailSink(args.dir, args.host, args.port).start()
    print(f"mail sink listening on {sink.url}, storing in {sink.directory}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        sink.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
