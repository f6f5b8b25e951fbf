"""What a tag may be (its key and value), and the date periods a version's creation time falls in.

A tag is a key with a value; a tag "with no value" has the value ``""``. Keys are short names of
letters, digits and ``_ . : -`` (so that ``user.s3repo.tag.<key>`` is a valid extended attribute
name and ``KEY=VALUE`` on a command line is unambiguous). Date tags are not stored: they are the
hour, day, ISO week, month and year of a version's ``created_at`` in UTC (the time its row was
written, which never changes, unlike ``published_at``), and a query for one is a range of
``created_at``, which an index answers.
"""

from __future__ import annotations

import datetime as dt
import re

from ..errors import InvalidTagError

MAX_KEY_LENGTH = 128
MAX_VALUE_LENGTH = 512  # 2,048 bytes at most: a PostgreSQL btree entry holds 2,704
_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*")
DATE_PERIODS = ("hour", "day", "week", "month", "year")
_UTC = dt.timezone.utc


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise InvalidTagError(f"tag key {key!r}: use letters, digits and _ . : - (not starting with . : -)")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidTagError(f"tag key {key[:20]!r}...: longer than {MAX_KEY_LENGTH} characters")
    return key


def validate_value(key: str, value: str | None) -> str:
    """The stored value: ``""`` for a tag with no value (None)."""
    if value is None:
        return ""
    if not isinstance(value, str) or "\0" in value:
        raise InvalidTagError(f"tag {key}: the value must be text without NUL, not {value!r}")
    if len(value) > MAX_VALUE_LENGTH:
        raise InvalidTagError(f"tag {key}: the value is longer than {MAX_VALUE_LENGTH} characters")
    return value


def parse_tag(text: str) -> tuple[str, str | None]:
    """``KEY=VALUE`` -> (KEY, VALUE); ``KEY`` -> (KEY, None)."""
    key, eq, value = text.partition("=")
    return validate_key(key), (value if eq else None)


def date_tags(timestamp: float) -> dict[str, str]:
    """The date tags of a timestamp (UTC): ``{"hour": "2026-11-03T14", "day": "2026-11-03", "week": "2026-W45",
    "month": "2026-11", "year": "2026"}``."""
    t = dt.datetime.fromtimestamp(timestamp, _UTC)
    year, week, _ = t.isocalendar()
    return {"hour": t.strftime("%Y-%m-%dT%H"), "day": t.strftime("%Y-%m-%d"), "week": f"{year}-W{week:02d}",
            "month": t.strftime("%Y-%m"), "year": t.strftime("%Y")}


def period_range(period: str, text: str) -> tuple[float, float]:
    """The ``[start, end)`` timestamps of a date tag's value (``period_range("month", "2026-11")``)."""
    try:
        if period == "hour":
            start = dt.datetime.strptime(text, "%Y-%m-%dT%H").replace(tzinfo=_UTC)
            end = start + dt.timedelta(hours=1)
        elif period == "day":
            start = dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=_UTC)
            end = start + dt.timedelta(days=1)
        elif period == "week":
            year, _, week = text.partition("-W")
            start = dt.datetime.fromisocalendar(int(year), int(week), 1).replace(tzinfo=_UTC)
            end = start + dt.timedelta(weeks=1)
        elif period == "month":
            start = dt.datetime.strptime(text, "%Y-%m").replace(tzinfo=_UTC)
            end = start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
        elif period == "year":
            start = dt.datetime.strptime(text, "%Y").replace(tzinfo=_UTC)
            end = start.replace(year=start.year + 1)
        else:
            raise InvalidTagError(f"unknown date period {period!r} (one of {', '.join(DATE_PERIODS)})")
    except ValueError:
        example = date_tags(0)[period]
        raise InvalidTagError(f"{period} {text!r}: not a {period} like {example}") from None
    return start.timestamp(), end.timestamp()
