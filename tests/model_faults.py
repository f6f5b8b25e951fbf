"""Faults for the reference-model test: a store and a database that fail now and then, as real ones do.

The store's uploads fail before or after the object is written (an answer lost), and its downloads
fail midway or deliver a body cut short or with a byte changed. The database fails before a
transaction, or after committing one (the COMMIT's answer lost). Each fault is drawn from a seeded
random generator, so a failing example replays.
"""

from __future__ import annotations

import random
from typing import Iterator

from s3repofs.errors import DatabaseUnavailableError, StoreUnavailableError
from s3repofs.objects.store import ObjectStore


class Faults:
    """Which calls fail: each with probability ``rate`` while ``on``."""

    def __init__(self, rate: float, seed: int = 0) -> None:
        self.rate = rate
        self.random = random.Random(seed)
        self.on = False
        self.injected = 0

    def strike(self) -> bool:
        if self.on and self.random.random() < self.rate:
            self.injected += 1
            return True
        return False

    def pick(self, *choices: str) -> str:
        return self.random.choice(choices)


class FaultyStore(ObjectStore):
    def __init__(self, store: ObjectStore, faults: Faults) -> None:
        self.inner, self.faults = store, faults
        self.bucket = getattr(store, "bucket", "")

    def put(self, key, source, size, md5, description, sent=None) -> bool:
        if self.faults.strike():
            if self.faults.pick("before", "answer lost") == "before":
                raise StoreUnavailableError(f"upload of {key}: injected fault")
            self.inner.put(key, source, size, md5, description, sent)
            raise StoreUnavailableError(f"upload of {key}: injected fault, the answer lost")
        return self.inner.put(key, source, size, md5, description, sent)

    def stream(self, key, start, end, size) -> Iterator[bytes]:
        if not self.faults.strike():
            yield from self.inner.stream(key, start, end, size)
            return
        fault = self.faults.pick("error", "cut short", "changed")
        body = b"".join(self.inner.stream(key, start, end, size))
        if fault == "error":
            yield body[: len(body) // 2]
            raise StoreUnavailableError(f"download of {key}: injected fault")
        if fault == "cut short":
            yield body[: len(body) // 2]
        elif body:
            yield body[:-1] + bytes([body[-1] ^ 0x55])

    def head(self, key):
        if self.faults.strike():
            raise StoreUnavailableError(f"head of {key}: injected fault")
        return self.inner.head(key)

    def delete(self, key) -> None:
        self.inner.delete(key)

    def list(self, prefix: str = ""):
        return self.inner.list(prefix)

    def describe_location(self) -> str:
        return self.inner.describe_location()

    def __getattr__(self, name):  # anything else a store has (check_access, ...)
        return getattr(self.inner, name)


def faulty_run(run, faults: Faults):
    """``Database.run`` that fails before a transaction, or after committing a write (its answer lost)."""

    def wrapped(fn, write: bool = True, one_trip: bool = False):
        if faults.strike():
            if not write or faults.pick("before", "answer lost") == "before":
                raise DatabaseUnavailableError("injected fault")
            run(fn, write, one_trip)
            raise DatabaseUnavailableError("injected fault: the COMMIT's answer lost")
        return run(fn, write, one_trip)

    return wrapped
