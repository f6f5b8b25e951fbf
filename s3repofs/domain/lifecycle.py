"""A version's lifecycle as values: its state, where its bytes are stored, and their storage tier.

Each is a ``StrEnum``: its members are the very strings the database stores and the CLI prints
(``State.PUBLISHED == "published"``), so a row read back compares equal to a member without
conversion. The transitions allowed between them are written down in one table (``TRANSITIONS``);
docs/internals.md draws it.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    """Where a version stands in its lifecycle."""

    UNPUBLISHED = "unpublished"  # staged: being written, or written and not yet published
    PUBLISHED = "published"  # the current version of its path (at most one per path)
    EXPIRED = "expired"  # was published; kept, readable, can be published again
    DISCARDED = "discarded"  # an unpublished version given up (removed, or replaced before publication)
    PURGED = "purged"  # an expired version whose object was deleted; the row stays as history


class Storage(StrEnum):
    """Where a version's bytes are."""

    LOCAL = "local"  # only in the staging area of the host that wrote them (origin_host)
    UPLOADED = "uploaded"  # in the object store, verified (size, md5)
    MISSING = "missing"  # lost from the object store and from every copy known


class Tier(StrEnum):
    """The object store's storage class for a version's object."""

    FRESH = "fresh"  # readable at once
    ARCHIVED = "archived"  # in an archive class: must be thawed before it can be read


# The states a mount and a listing show, each as a top-level directory of the mount.
VISIBLE_STATES = (State.UNPUBLISHED, State.PUBLISHED, State.EXPIRED)
