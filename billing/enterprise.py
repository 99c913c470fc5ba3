"""Enterprise inquiries: the public site's contact form, kept for the operator to answer
(`enterprise_inquiries`; `darkgpu admin enterprise list`, `… handled --id N`).

Every field is checked here, not only in the form: a name, company and message of bounded
length (the columns' own limits), an email address as signup accepts them, no control
characters but the message's line breaks. The site throttles submissions per client address
and network before anything is stored.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from billing import signup
from core.schema import EnterpriseInquiry, utcnow
from kernel.errors import InvalidRequest, NotFound

NAME_MAX = 200
COMPANY_MAX = 200
MESSAGE_MAX = 4000
MESSAGE_MIN = 10
_LINE_BREAKS = re.compile(r"\r\n?")


class InquiryError(InvalidRequest):
    """A field of the form is not acceptable: the message says which and why."""


@dataclass(frozen=True)
class Inquiry:
    id: int
    name: str
    email: str
    company: str
    message: str
    created_at: str
    handled_at: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _text(value: str, field: str, label: str, low: int, high: int, lines: bool = False) -> str:
    value = _LINE_BREAKS.sub("\n", value).strip()
    if any(unicodedata.category(ch) == "Cc" and not (lines and ch in "\n\t") for ch in value):
        raise InquiryError(f"The {label} has characters that cannot be stored.", param=field)
    if not low <= len(value) <= high:
        raise InquiryError(f"The {label} must be {low} to {high:,} characters.", param=field)
    return value


def submit(engine: Engine, *, name: str, email: str, company: str, message: str) -> Inquiry:
    """Store one inquiry, every field checked; raises InquiryError naming the bad field."""
    fields = {
        "name": _text(name, "name", "name", 1, NAME_MAX),
        "company": _text(company, "company", "company", 1, COMPANY_MAX),
        "message": _text(message, "message", "message", MESSAGE_MIN, MESSAGE_MAX, lines=True),
    }
    try:
        fields["email"] = signup.normalize_email(email)
    except signup.SignupError:
        raise InquiryError("That is not a valid email address.", param="email") from None
    with Session(engine) as session, session.begin():
        row = EnterpriseInquiry(**fields)
        session.add(row)
        session.flush()
        return _info(row)


def _info(row: EnterpriseInquiry) -> Inquiry:
    return Inquiry(
        id=row.id,
        name=row.name,
        email=row.email,
        company=row.company,
        message=row.message,
        created_at=row.created_at.isoformat(),
        handled_at=row.handled_at.isoformat() if row.handled_at else None,
    )


def inquiries(engine: Engine, *, include_handled: bool = False) -> list[Inquiry]:
    """The inquiries, oldest first (those not handled yet, unless `include_handled`)."""
    query = select(EnterpriseInquiry).order_by(EnterpriseInquiry.id)
    if not include_handled:
        query = query.where(EnterpriseInquiry.handled_at.is_(None))
    with Session(engine) as session:
        return [_info(row) for row in session.scalars(query)]


def mark_handled(engine: Engine, inquiry_id: int) -> Inquiry:
    with Session(engine) as session, session.begin():
        row = session.get(EnterpriseInquiry, inquiry_id)
        if row is None:
            raise NotFound(f"no enterprise inquiry {inquiry_id}")
        if row.handled_at is None:
            row.handled_at = utcnow()
        session.flush()
        return _info(row)
