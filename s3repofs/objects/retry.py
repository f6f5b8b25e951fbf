"""The one retry policy for S3: which failures are transient, how many attempts each thing gets, and
how long to wait between them. Every layer that talks to S3 takes its numbers from here.

What is transient: an answer with a status in ``TRANSIENT_STATUSES`` (500, 502, 503 — SlowDown
included — and 504, the statuses botocore's standard mode retries) or S3's ``RequestTimeout``; a
connection closed without an answer; a body that broke off or stalled for ``READ_TIMEOUT``. The S3
store raises these as ``TransientStoreError``. A refusal (403) or a missing object is never retried;
a connection refused, or not made within ``CONNECT_TIMEOUT``, only by the HTTP client's attempts.

How often, by layer:

- Each request, by the HTTP client: up to ``ATTEMPTS`` attempts. boto3's client (botocore's
  "standard" retry mode) and the signed fast path (``s3http``, on urllib3) both get ``ATTEMPTS``
  and ``TRANSIENT_STATUSES`` from here; the fast path waits ``backoff()``, botocore its own
  full-jitter backoff with wider windows (up to 1 s, then 2 s, 4 s...: botocore lets no caller set it).
- A download (``local.transfer``) asks again for the rest of a part whose request failed
  transiently after those attempts, or whose body broke off or ended short: up to ``ATTEMPTS``
  attempts per part, each resuming where the last one stopped.
- An object whose digest does not match is downloaded again, up to ``DIGEST_ATTEMPTS`` times in
  all (each costs a whole object), and only while no reader has been served its unverified bytes.

Backoff: exponential with full jitter (AWS's "Exponential Backoff And Jitter"): after the n-th
failed attempt, a random pause in [0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (n - 1))], so 0-0.1 s,
0-0.2 s, 0-0.4 s...: many clients that failed together do not come back together.
"""

from __future__ import annotations

import random
from typing import Callable

import tenacity
import urllib3

from .. import metrics

ATTEMPTS = 4  # per request, and per part of a download: the first try and three more
DIGEST_ATTEMPTS = 3  # whole downloads of an object whose digest did not match
TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})
TRANSIENT_CODES = frozenset({"RequestTimeout"})  # S3's 400 for a request body that did not arrive in time
BACKOFF_BASE = 0.1  # seconds: the widest first pause
BACKOFF_CAP = 2.0  # seconds: no pause is longer
CONNECT_TIMEOUT = 5  # seconds to open a connection to S3
READ_TIMEOUT = 60  # seconds without a byte before a request to S3 fails


def transient_answer(status: int, code: str = "") -> bool:
    """May a later attempt get another answer than this error answer (HTTP ``status``, S3 error ``code``)?"""
    return status in TRANSIENT_STATUSES or code in TRANSIENT_CODES


def backoff(failures: int) -> float:
    """The pause, in seconds, before the next attempt after ``failures`` failed ones (at least 1)."""
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (failures - 1)))


def botocore_retries() -> dict[str, int | str]:
    """The ``retries`` of botocore's client config: botocore's standard mode retries the same
    statuses and broken connections, up to ``ATTEMPTS`` attempts in all."""
    return {"total_max_attempts": ATTEMPTS, "mode": "standard"}


def count_client_retries(client) -> None:
    """Count the retries botocore's ``client`` makes (its attempts beyond the first, at each request's end,
    answered or not) as ``s3_request`` retries."""

    def count(context: dict, **_: object) -> None:
        attempts = context.get("retries", {}).get("attempt", 1)
        if attempts > 1:
            metrics.REQUEST_RETRIES.inc(attempts - 1)

    client.meta.events.register("after-call.s3", count)
    client.meta.events.register("after-call-error.s3", count)


class _Urllib3Retry(urllib3.Retry):
    """urllib3's retries with this policy's backoff (urllib3's own waits nothing before the first retry),
    each one counted as an ``s3_request`` retry."""

    def get_backoff_time(self) -> float:
        return backoff(len(self.history))  # the signed requests follow no redirects: every entry is a failure

    def increment(self, *args, **kwargs) -> urllib3.Retry:
        retried = super().increment(*args, **kwargs)  # raises MaxRetryError instead once none is left
        metrics.REQUEST_RETRIES.inc()
        return retried


def urllib3_retries() -> urllib3.Retry:
    """The retries of the signed fast path's pool: GETs and PUTs of one key are idempotent, so both are
    retried (a PUT's body is rewound), on the same statuses and up to ``ATTEMPTS`` attempts in all."""
    return _Urllib3Retry(total=ATTEMPTS - 1, status_forcelist=TRANSIENT_STATUSES, allowed_methods=("GET", "PUT"),
                         raise_on_status=False)


def attempts(limit: int, retry_on: type[BaseException] | tuple[type[BaseException], ...], *,
             sleep: Callable[[float], None],
             before_retry: Callable[[tenacity.RetryCallState], None]) -> tenacity.Retrying:
    """Up to ``limit`` attempts at one thing, with this policy's backoff (use as tenacity's
    ``for attempt in ...: with attempt: ...``). An attempt that raises ``retry_on`` is tried again,
    after ``before_retry(state)`` and ``sleep(seconds)`` (which may raise to stop at once); any other
    exception, or the last attempt's, is raised as it is."""
    return tenacity.Retrying(stop=tenacity.stop_after_attempt(limit), retry=tenacity.retry_if_exception_type(retry_on),
                             wait=lambda state: backoff(state.attempt_number), sleep=sleep,
                             before_sleep=before_retry, reraise=True)
