"""CSV that is safe to open in a spreadsheet.

Some cells carry text a consumer or a provider chose (an `X-Customer-Id` tag, a provider id,
a model name in a memo). A cell that starts with `=`, `+`, `-`, `@`, a tab or a carriage
return is run as a formula by Excel, LibreOffice and Google Sheets ("CSV injection"), so such a
text cell is written with a leading `'`, which spreadsheets show as text (OWASP's advice).
Numbers are written as they are: a negative amount stays a number.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


class Writer:
    """`csv.writer` with every cell made safe."""

    def __init__(self, out: TextIO) -> None:
        self._writer = csv.writer(out)

    def writerow(self, row: Iterable[Any]) -> None:
        self._writer.writerow([cell(v) for v in row])


class DictWriter:
    """`csv.DictWriter` with every cell made safe."""

    def __init__(self, out: TextIO, fieldnames: Iterable[str]) -> None:
        self._writer = csv.DictWriter(out, fieldnames=list(fieldnames))

    def writeheader(self) -> None:
        self._writer.writeheader()

    def writerow(self, row: Mapping[str, Any]) -> None:
        self._writer.writerow({k: cell(v) for k, v in row.items()})
