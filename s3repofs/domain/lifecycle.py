"""A version's lifecycle as values: its state, where its bytes are stored, and their storage tier.

Each is a ``StrEnum``: its members are the very strings the database stores and the CLI prints
(``State.PUBLISHED == "published"``), so a row read back compares equal to a member without
conversion. The transitions allowed between them are written down in one table (``TRANSITIONS``);
docs/internals.md draws it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Mapping

from ..errors import LifecycleError


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
    """The object store's storage class for a version's object, as the code and the CLI show it."""

    FRESH = "fresh"  # readable at once
    ARCHIVED = "archived"  # in an archive class: must be thawed before it can be read
    # Its restore was asked for (``s3repofs thaw``), and it is not finished yet. Never stored in the tier
    # column (its CHECK allows fresh and archived only, and SQLite cannot alter a CHECK): a thawing version
    # is stored as tier archived with ``thaw_requested_at`` set (``Version.shown_tier``).
    THAWING = "thawing"


# The S3 storage classes whose objects must be restored before a GET: what tier archived means.
# (GLACIER_IR, STANDARD_IA... are read at once: a version stored so is fresh.)
ARCHIVE_CLASSES = ("GLACIER", "DEEP_ARCHIVE")


# The states a mount and a listing show, each as a top-level directory of the mount.
VISIBLE_STATES = (State.UNPUBLISHED, State.PUBLISHED, State.EXPIRED)

Facet = State | Storage | Tier

# Every change of a version's state, storage or tier that the code makes, and what makes it: a change
# not in this table is refused (check_transition). A publish at another path moves a published version
# without changing its state, and is checked like any publish.
TRANSITIONS: Mapping[tuple[Facet, Facet], str] = {
    (State.UNPUBLISHED, State.PUBLISHED): "publish (close in published/, mv into published/, setxattr)",
    (State.UNPUBLISHED, State.DISCARDED): "discard (rm in unpublished/, replaced by a newer staged version)",
    (State.PUBLISHED, State.EXPIRED): "expire (rm in published/, setxattr, a newer version published)",
    (State.PUBLISHED, State.PUBLISHED): "publish at another path (mv inside published/)",
    (State.EXPIRED, State.PUBLISHED): "re-publish (mv expired/ -> published/, setxattr)",
    (State.EXPIRED, State.PURGED): "purge (gc, after expired_retention: the row is kept, then the object deleted)",
    (Storage.LOCAL, Storage.UPLOADED): "upload (a flush, close or publish; the retry of staged uploads)",
    (Storage.UPLOADED, Storage.MISSING): "fsck --repair: the object is lost, and no verified copy is on this host",
    (Storage.MISSING, Storage.UPLOADED): "fsck --repair: the lost object re-uploaded from a verified local copy",
    (Tier.FRESH, Tier.ARCHIVED): "archive (s3repofs archive: the object copied into archive_storage_class)",
    (Tier.ARCHIVED, Tier.THAWING): "thaw (s3repofs thaw: the object's restore requested)",
    (Tier.THAWING, Tier.FRESH): "thaw finished (the restored object copied back into the standard class)",
    (Tier.THAWING, Tier.ARCHIVED): "thaw lapsed (the restored copy expired before the thaw was finished)",
}


def check_transition(version: str, old: Facet, new: Facet) -> None:
    """Refuse, with LifecycleError, a change from ``old`` to ``new`` that TRANSITIONS does not hold.
    ``version`` names the version for the message (``"t/a.txt: version 7"``)."""
    if (old, new) in TRANSITIONS:
        return
    sources = [source for source, target in TRANSITIONS if target == new]
    if not sources:
        raise LifecycleError(f"{version} is {old}; no version can be {new}")
    article = "an" if sources[0][0] in "aeiou" else "a"
    listed = ", ".join(sources[:-1]) + " or " + sources[-1] if len(sources) > 1 else sources[0]
    raise LifecycleError(f"{version} is {old}; only {article} {listed} version can be {new}")
