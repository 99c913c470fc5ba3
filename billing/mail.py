"""Mail from the platform: one message through the configured SMTP server.

Every mail the platform sends (the signup verification link, a password-reset link, the
low-balance alert) goes through `send`, so SMTP's settings (`Settings.smtp_*`,
`mail_from`) are read in one place. `public_link` makes the absolute links they carry.
"""

from __future__ import annotations

import smtplib
from email.message import EmailMessage
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.settings import Settings

TIMEOUT_S = 15


def enabled(settings: Settings) -> bool:
    """Mail can be sent (an SMTP server is configured)."""
    return bool(settings.smtp_host)


def public_link(settings: Settings, path: str) -> str:
    """`path` under the platform's public address (`public_url`, else its HTTP address)."""
    base = settings.public_url or f"http://{settings.http_host}:{settings.http_port}"
    return f"{base.rstrip('/')}{path}"


def send(settings: Settings, *, to: str, subject: str, body: str) -> None:
    """Send one plain-text message; raises what smtplib raises (the caller decides whether
    a mail that was not sent matters)."""
    message = EmailMessage()
    message["From"] = settings.mail_from
    message["To"] = to
    message["Subject"] = subject
    message.set_content(body)
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=TIMEOUT_S) as smtp:
        if settings.smtp_starttls:
            smtp.starttls()
        if settings.smtp_username:
            smtp.login(settings.smtp_username, settings.smtp_password.get_secret_value())
        smtp.send_message(message)
