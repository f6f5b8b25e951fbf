"""The query behind ``repo.find``: versions by type, prefix, state, tags, host and times, as one indexed SELECT."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from ..domain.lifecycle import VISIBLE_STATES
from ..domain.paths import DirPath


@dataclass(frozen=True)
class FindQuery:
    """What ``MetaStore.find_page`` looks for; tags as {key: value}, a value of None for any value. Times are
    ``[after, before)``."""

    file_type: str | None = None
    prefix: DirPath | None = None
    states: tuple[str, ...] = ()  # empty: every visible state
    tags_all: Mapping[str, str | None] = field(default_factory=dict)
    tags_any: Mapping[str, str | None] = field(default_factory=dict)
    tags_none: Mapping[str, str | None] = field(default_factory=dict)
    origin_host: str | None = None
    published_after: float | None = None
    published_before: float | None = None
    created_after: float | None = None
    created_before: float | None = None


def _tag_match(key: str, value: str | None) -> tuple[str, list]:
    if value is None:
        return "key = ?", [key]
    return "key = ? AND value = ?", [key, value]


def find_condition(query: FindQuery, after_id: int) -> tuple[str, list]:
    """The WHERE condition on ``versions`` of ``query``'s versions with ids above ``after_id`` (its prefix
    is the caller's: ``MetaStore._scope``). Each tag condition is a lookup in ``tags_by_key`` (migration 5),
    a date range one in ``versions_by_state``: none scans ``versions``."""
    clauses, params = ["id > ?"], [after_id]
    states = query.states or VISIBLE_STATES
    clauses.append(f"state IN ({', '.join('?' * len(states))})")
    params += [str(s) for s in states]
    for column in ("file_type", "origin_host"):
        if getattr(query, column) is not None:
            clauses.append(f"{column} = ?")
            params.append(getattr(query, column))
    for column, low, high in (("published_at", query.published_after, query.published_before),
                              ("created_at", query.created_after, query.created_before)):
        if low is not None:
            clauses.append(f"{column} >= ?")
            params.append(low)
        if high is not None:
            clauses.append(f"{column} < ?")
            params.append(high)
    for key, value in query.tags_all.items():
        match, match_params = _tag_match(key, value)
        clauses.append(f"id IN (SELECT version_id FROM tags WHERE {match})")
        params += match_params
    if query.tags_any:
        matches = [_tag_match(key, value) for key, value in query.tags_any.items()]
        union = " UNION ".join(f"SELECT version_id FROM tags WHERE {match}" for match, _ in matches)
        clauses.append(f"id IN ({union})")
        params += [p for _, ps in matches for p in ps]
    for key, value in query.tags_none.items():
        match, match_params = _tag_match(key, value)
        clauses.append(f"NOT EXISTS (SELECT 1 FROM tags WHERE version_id = versions.id AND {match})")
        params += match_params
    return " AND ".join(clauses), params
