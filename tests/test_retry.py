"""The one retry policy for S3 (objects/retry.py): what is transient, how many attempts, bounded
backoff, and every HTTP client configured from it (pure logic: no servers)."""

from __future__ import annotations

import botocore.exceptions
import pytest
from botocore.retries.standard import TransientRetryableChecker
from urllib3.util.retry import RequestHistory

from s3repofs.errors import StoreUnavailableError, TransientStoreError
from s3repofs.objects import retry
from s3repofs.objects.s3 import S3Store


@pytest.mark.parametrize("status, code", [(500, "InternalError"), (502, ""), (503, "SlowDown"), (504, ""),
                                          (400, "RequestTimeout")])
def test_server_errors_and_request_timeouts_are_transient(status, code):
    assert retry.transient_answer(status, code)


@pytest.mark.parametrize("status, code", [(400, "InvalidArgument"), (403, "AccessDenied"), (404, "NoSuchKey"),
                                          (501, "NotImplemented"), (505, "")])
def test_refusals_and_unsupported_requests_are_permanent(status, code):
    assert not retry.transient_answer(status, code)


def _store_error(status: int, code: str) -> Exception:
    store = S3Store("bucket", endpoint_url="http://127.0.0.1:9", access_key="key", secret_key="secret")
    answer = {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    with pytest.raises(StoreUnavailableError) as info, store._errors("k", "download"):
        raise botocore.exceptions.ClientError(answer, "GetObject")
    return info.value


def test_the_s3_store_raises_transient_answers_as_transient_store_errors():
    assert isinstance(_store_error(503, "SlowDown"), TransientStoreError)
    assert isinstance(_store_error(400, "RequestTimeout"), TransientStoreError)
    assert not isinstance(_store_error(501, "NotImplemented"), TransientStoreError)
    assert not isinstance(_store_error(403, "AccessDenied"), TransientStoreError)


@pytest.mark.parametrize("failures", range(1, 12))
def test_backoff_is_jittered_within_an_exponential_window_and_capped(failures):
    window = min(retry.BACKOFF_CAP, retry.BACKOFF_BASE * 2 ** (failures - 1))
    pauses = [retry.backoff(failures) for _ in range(200)]
    assert all(0 <= pause <= window <= retry.BACKOFF_CAP for pause in pauses)
    assert max(pauses) > window / 2  # jitter spreads over the window


def test_the_boto3_client_retries_as_the_policy_says():
    store = S3Store("bucket", endpoint_url="http://127.0.0.1:9", access_key="key", secret_key="secret")
    assert store.client.meta.config.retries == {"total_max_attempts": retry.ATTEMPTS, "mode": "standard"}
    assert store.client.meta.config.read_timeout == retry.READ_TIMEOUT
    # botocore's standard mode retries the same statuses (its list, not ours: the policies must agree).
    assert frozenset(TransientRetryableChecker._TRANSIENT_STATUS_CODES) == retry.TRANSIENT_STATUSES


def test_the_signed_fast_path_retries_as_the_policy_says():
    retries = retry.urllib3_retries()
    assert retries.total == retry.ATTEMPTS - 1
    assert frozenset(retries.status_forcelist) == retry.TRANSIENT_STATUSES
    assert set(retries.allowed_methods) == {"GET", "PUT"}
    for failures in range(1, retry.ATTEMPTS):
        history = tuple(RequestHistory("GET", "/k", None, 503, None) for _ in range(failures))
        later = retries.new(history=history)
        assert isinstance(later, type(retries))  # urllib3 keeps the policy's backoff from one retry to the next
        assert 0 <= later.get_backoff_time() <= retry.BACKOFF_BASE * 2 ** (failures - 1)


def _attempt_all(limit, failures, retry_on=TransientStoreError):
    """Run attempts that raise the given failures in turn (then succeed); the attempts and pauses made."""
    calls, pauses, told = [], [], []
    for attempt in retry.attempts(limit, retry_on, sleep=pauses.append, before_retry=told.append):
        with attempt:
            calls.append(attempt.retry_state.attempt_number)
            if len(calls) <= len(failures):
                raise failures[len(calls) - 1]
    return calls, pauses, told


def test_attempts_retry_a_transient_failure_until_one_succeeds():
    calls, pauses, told = _attempt_all(4, [TransientStoreError("a"), TransientStoreError("b")])
    assert calls == [1, 2, 3]
    assert len(pauses) == len(told) == 2
    assert all(0 <= pause <= retry.BACKOFF_BASE * 2 for pause in pauses)


def test_attempts_give_up_after_the_limit_with_the_last_failure():
    with pytest.raises(TransientStoreError, match="^4$"):
        _attempt_all(4, [TransientStoreError(str(n)) for n in range(1, 6)])


def test_attempts_raise_a_permanent_failure_at_once():
    with pytest.raises(StoreUnavailableError, match="refused") as info:
        _attempt_all(4, [StoreUnavailableError("refused"), TransientStoreError("never reached")])
    assert not isinstance(info.value, TransientStoreError)


def test_a_pause_that_raises_ends_the_attempts():
    def stopped(seconds):
        raise RuntimeError("another part failed")

    attempts = retry.attempts(4, TransientStoreError, sleep=stopped, before_retry=lambda state: None)
    calls = []
    with pytest.raises(RuntimeError, match="another part failed"):
        for attempt in attempts:
            with attempt:
                calls.append(1)
                raise TransientStoreError("x")
    assert calls == [1]
