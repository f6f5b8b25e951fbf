"""How the holders of a version read to an operator: ``hostB (seen 2 min ago)``, for info, status and fsck."""

from __future__ import annotations

from typing import Callable, Sequence

from ..meta.holders import Holder


def ago(seconds: float) -> str:
    """A duration, rounded to the unit that says it best: ``12 s``, ``2 min``, ``5 h``, ``3 d``."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size or (unit == "min" and seconds >= size):
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def seen(last_seen: float | None, live: bool, now: float) -> str:
    """``seen 2 min ago``, ``gone: last seen 3 d ago``, or ``gone: never seen``."""
    if last_seen is None:
        return "gone: never seen"
    return f"{'' if live else 'gone: last '}seen {ago(now - last_seen)} ago"


def describe(holder: Holder, now: float, this_host: str | None = None,
             verified: Callable[[float], str] | None = None) -> str:
    """``hostB (seen 2 min ago)``; ``(this host)`` for ``this_host``; with ``verified`` (a time's format),
    ``hostB (seen 2 min ago; verified <time>)``."""
    liveness = "this host" if holder.host == this_host else seen(holder.last_seen, holder.live, now)
    when = f"; verified {verified(holder.verified_at)}" if verified else ""
    return f"{holder.host} ({liveness}{when})"


def copies(holders: Sequence[Holder], now: float, this_host: str) -> str:
    """What an fsck finding says of the recorded verified copies of its version."""
    if not holders:
        return "no host recorded a verified copy"
    return f"verified copies on: {', '.join(describe(h, now, this_host) for h in holders)}"


def copies_elsewhere(holders: Sequence[Holder], now: float, this_host: str) -> str:
    """What an fsck repair without a copy here says: where the other hosts' copies are, and what to run there
    ("" if no other host recorded one)."""
    others = [h for h in holders if h.host != this_host]
    if not others:
        return ""
    return f"{copies(others, now, this_host)}; run `s3repofs fsck --repair` there"
