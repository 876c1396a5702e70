"""Transports for alert messages: SMTP e-mail and a JSON webhook, behind one small interface.

A channel's ``send`` calls ``handover()`` immediately before the step after which the
receiver may have the message (for SMTP: the end-of-data line that makes the server
accept it; for HTTP: the request itself). The outbox commits a marker in that callback,
which is what lets a later run tell "crashed before the receiver could have it" (safe to
send again) from "crashed after" (do not send again). See :mod:`pipelines.alerts.outbox`.

Errors say what is known about the message:

* :class:`NotDelivered` -- the receiver certainly does not have it; ``permanent`` when
  retrying cannot help (a 5xx SMTP reply, an HTTP 4xx);
* :class:`DeliveryUncertain` -- something broke after the hand-over, the receiver may or
  may not have it.
"""

from __future__ import annotations

import email.policy
import json
import re
import smtplib
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate
from typing import Protocol

from pipelines.alerts.render import Message, webhook_body
from pipelines.errors import ConfigError
from pipelines.settings import Settings

SENDER = "kyphowatch <kyphowatch@localhost>"
TIMEOUT_SECONDS = 30.0


class NotDelivered(Exception):
    """The message did not reach the receiver."""

    def __init__(self, message: str, *, permanent: bool = False, channel_down: bool = False):
        super().__init__(message)
        self.permanent = permanent
        # the whole channel is unreachable: do not try its other messages in this run
        self.channel_down = channel_down


class DeliveryUncertain(Exception):
    """The transport failed after hand-over; the receiver may have the message."""


class Channel(Protocol):
    """What the outbox needs from a transport."""

    name: str

    def send(self, message: Message, message_id: str, recipients: tuple[str, ...],
             handover: Callable[[], None]) -> None: ...  # fmt: skip

    def close(self) -> None: ...


def _dot_stuffed(data: bytes) -> bytes:
    """Return message bytes escaped for the SMTP DATA phase, without the end marker."""
    data = re.sub(rb"(?m)^\.", b"..", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


class SmtpChannel:
    """Send multipart (text + HTML) e-mail over one reused SMTP connection."""

    name = "email"

    def __init__(self, url: str, sender: str = SENDER, timeout: float = TIMEOUT_SECONDS):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in {"smtp", "smtps"} or not parsed.hostname:
            raise ConfigError(f"smtp_url must look like smtp://host:port, got {url!r}")
        self.scheme = parsed.scheme
        self.host = parsed.hostname
        self.port = parsed.port or (465 if parsed.scheme == "smtps" else 25)
        self.username = urllib.parse.unquote(parsed.username) if parsed.username else None
        self.password = urllib.parse.unquote(parsed.password) if parsed.password else None
        self.sender = sender
        self.timeout = timeout
        self._smtp: smtplib.SMTP | None = None

    def _connection(self) -> smtplib.SMTP:
        if self._smtp is not None:
            return self._smtp
        try:
            if self.scheme == "smtps":
                smtp = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout)
            else:
                smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
            smtp.ehlo()
            if self.username:
                if self.scheme == "smtp" and smtp.has_extn("starttls"):
                    smtp.starttls()
                    smtp.ehlo()
                smtp.login(self.username, self.password or "")
        except (OSError, smtplib.SMTPException) as exc:
            raise NotDelivered(
                f"mail server {self.host}:{self.port} unreachable: {type(exc).__name__}: {exc}",
                channel_down=True,
            ) from exc
        self._smtp = smtp
        return smtp

    def _build(self, message: Message, message_id: str, recipients: tuple[str, ...]) -> bytes:
        mail = EmailMessage()
        mail["From"] = self.sender
        mail["To"] = ", ".join(recipients)
        mail["Subject"] = message.subject
        mail["Date"] = formatdate(localtime=False, usegmt=True)
        mail["Message-ID"] = message_id
        mail["X-Kyphowatch-Alert"] = message.alert_id
        mail["X-Kyphowatch-Kind"] = message.kind
        mail.set_content(message.text)
        mail.add_alternative(message.html, subtype="html")
        return mail.as_bytes(policy=email.policy.SMTP)

    def _refused(self, step: str, code: int, reply: bytes) -> NotDelivered:
        text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
        return NotDelivered(f"mail server refused {step}: {code} {text}", permanent=500 <= code < 600)

    def send(self, message: Message, message_id: str, recipients: tuple[str, ...],
             handover: Callable[[], None]) -> None:  # fmt: skip
        """Send one e-mail; ``handover`` runs just before the end-of-data line."""
        if not recipients:
            raise NotDelivered(f"no recipients configured for {message.kind} alerts")
        data = _dot_stuffed(self._build(message, message_id, recipients))
        smtp = self._connection()
        try:
            code, reply = smtp.mail(self.sender)
            if code != 250:
                raise self._refused("sender", code, reply)
            for recipient in recipients:
                code, reply = smtp.rcpt(recipient)
                if code not in (250, 251):
                    raise self._refused(f"recipient {recipient}", code, reply)
            code, reply = smtp.docmd("DATA")
            if code != 354:
                raise self._refused("DATA", code, reply)
            smtp.send(data)
        except NotDelivered:
            self._reset()
            raise
        except (OSError, smtplib.SMTPException) as exc:
            self.close()
            raise NotDelivered(f"mail transfer failed before hand-over: {exc}") from exc
        try:
            handover()
        except BaseException:
            self.close()  # the server discards a message whose data never ended
            raise
        try:
            smtp.send(b".\r\n")
            code, reply = smtp.getreply()
        except (OSError, smtplib.SMTPException) as exc:
            self.close()
            raise DeliveryUncertain(f"mail server went away after the message data: {exc}") from exc
        if code != 250:
            raise self._refused("the message", code, reply)

    def _reset(self) -> None:
        try:
            if self._smtp is not None:
                self._smtp.rset()
        except (OSError, smtplib.SMTPException):
            self.close()

    def close(self) -> None:
        """Say goodbye to the server (best effort)."""
        if self._smtp is None:
            return
        try:
            self._smtp.quit()
        except (OSError, smtplib.SMTPException):
            self._smtp.close()
        self._smtp = None


# Errors that mean the request never left this host or reached no server.
_NOT_CONNECTED = (ConnectionRefusedError, socket.gaierror, ConnectionAbortedError)


class WebhookChannel:
    """POST a JSON body with an ``Idempotency-Key`` header to one URL."""

    name = "webhook"

    def __init__(self, url: str, timeout: float = TIMEOUT_SECONDS):
        if urllib.parse.urlsplit(url).scheme not in {"http", "https"}:
            raise ConfigError(f"webhook_url must be an http(s) URL, got {url!r}")
        self.url = url
        self.timeout = timeout

    def send(self, message: Message, message_id: str, recipients: tuple[str, ...],
             handover: Callable[[], None]) -> None:  # fmt: skip
        """POST one alert; ``handover`` runs just before the request is sent."""
        body = json.dumps(webhook_body(message, message_id), sort_keys=True).encode("utf-8")
        request = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Idempotency-Key": message_id,
                "User-Agent": "kyphowatch-alerts",
            },
        )
        handover()
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - URL from configuration, scheme checked
                response.read()
        except urllib.error.HTTPError as exc:
            # The server answered: it did not take the message.
            permanent = 400 <= exc.code < 500 and exc.code not in (408, 425, 429)
            raise NotDelivered(f"webhook answered HTTP {exc.code}", permanent=permanent) from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, _NOT_CONNECTED):
                raise NotDelivered(f"webhook unreachable: {exc.reason}", channel_down=True) from exc
            raise DeliveryUncertain(f"webhook request failed: {exc.reason}") from exc
        except (TimeoutError, OSError) as exc:
            raise DeliveryUncertain(f"webhook request failed: {exc}") from exc

    def close(self) -> None:
        """Nothing to close: each POST uses its own connection."""


def make_channels(settings: Settings) -> dict[str, Channel]:
    """Return the configured channels by name, chosen once from ``settings``."""
    channels: dict[str, Channel] = {}
    if settings.smtp_url:
        channels["email"] = SmtpChannel(settings.smtp_url, sender=settings.mail_from)
    if settings.webhook_url:
        channels["webhook"] = WebhookChannel(settings.webhook_url)
    return channels
