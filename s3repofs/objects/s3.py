"""The object store in an S3 bucket, through boto3 (and s3http's signed requests on the hot paths), on AWS
or any S3-compatible endpoint; ``S3Store._errors`` is the one table from S3's failures to RepoErrors.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO, Callable, Iterator
from urllib.parse import quote, unquote

from .. import metrics
from ..domain.content import CHUNK
from ..errors import (
    ArchivedError,
    ObjectMissingError,
    RepoError,
    StoreUnavailableError,
    TransientStoreError,
    VerificationError,
)
from . import retry
from .store import ObjectInfo, ObjectStore, read_description

log = logging.getLogger(__name__)

FIRST_CHUNK = 128 * 1024  # a reader waiting for the first bytes is served before a whole chunk arrived
META_PREFIX = "s3repo-"
S3_METADATA_LIMIT = 2048  # bytes of user metadata S3 takes per object, its keys and values added up (UTF-8)
PATH_OBJECT_SUFFIX = ".path"  # the object beside an object whose path is too long for its metadata
_MD5_HEX = re.compile(r"[0-9a-f]{32}")
COPY_OBJECT_LIMIT = 5 * 1024**3  # the largest object one CopyObject copies (an S3 rule)
COPY_PART_SIZE = 512 * 1024**2  # parts of a larger copy: copied inside S3, so large ones cost fewer requests



def _metadata_size(metadata: dict[str, str]) -> int:
    """What S3 counts against its limit of user metadata: the UTF-8 bytes of every key and value."""
    return sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())



class FileSlice:
    """A read-only window of an open file, streamed as one request body: memory stays at a chunk per
    request, whatever the part size (S3 checks each body against its Content-MD5). The HTTP client
    reads it as it sends, so ``sent`` (None: nothing to call) hears of each count of bytes read, and of
    a rewind for a retry as a negative count, as boto3's transfer Callback does. Reads while ``sending``
    is False (botocore hashing the body to sign it: see ``_not_sending``) are not counted."""

    def __init__(self, file: BinaryIO, start: int, length: int, sent: Callable[[int], None] | None = None) -> None:
        self._fd = file.fileno()
        self._start = start
        self._length = length
        self._pos = 0
        self._sent = sent
        self.sending = True

    def __len__(self) -> int:
        return self._length

    def read(self, size: int | None = -1) -> bytes:
        left = self._length - self._pos
        size = left if size is None or size < 0 else min(size, left)
        data = os.pread(self._fd, size, self._start + self._pos)
        self._moved(len(data))
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._moved(max(0, min(base + offset, self._length)) - self._pos)
        return self._pos

    def _moved(self, n: int) -> None:
        self._pos += n
        if self._sent is not None and n and self.sending:
            self._sent(n)

    def tell(self) -> int:
        return self._pos

    def md5(self) -> bytes:
        """The md5 of the window (read without moving it: nothing is sent)."""
        digest = hashlib.md5()
        for offset in range(0, self._length, CHUNK):
            digest.update(os.pread(self._fd, min(CHUNK, self._length - offset), self._start + offset))
        return digest.digest()


def _not_sending(request, **kwargs) -> None:
    """Before botocore signs a request (over plain HTTP it reads the whole body to hash it, then rewinds):
    the body's reads are not bytes sent. (s3transfer's signal_not_transferring, for boto3's Callback.)"""
    if isinstance(request.body, FileSlice):
        request.body.sending = False


def _sending(request, **kwargs) -> None:
    if isinstance(request.body, FileSlice):
        request.body.sending = True



class S3Store(ObjectStore):
    """Objects in an S3 bucket through boto3, on AWS or any S3-compatible endpoint."""

    def __init__(self, bucket: str, *, endpoint_url: str | None = None, region: str | None = None,
                 access_key: str | None = None, secret_key: str | None = None,
                 multipart_threshold: int = 128 * 1024**2, multipart_chunksize: int = 16 * 1024**2,
                 concurrency: int = 8) -> None:
        import boto3
        import botocore.config
        import botocore.exceptions
        import botocore.session

        from .s3http import SignedRequests

        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self.concurrency = concurrency
        core = botocore.session.get_session()
        session = boto3.session.Session(aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                                        region_name=region or "us-east-1", botocore_session=core)
        connections = max(10, 2 * concurrency)
        # One client per store, shared by every thread (boto3 clients are thread-safe).
        config = botocore.config.Config(
            connect_timeout=retry.CONNECT_TIMEOUT, read_timeout=retry.READ_TIMEOUT, retries=retry.botocore_retries(),
            max_pool_connections=connections,
            # Integrity is ours: Content-MD5 on every body we send, a digest of every object we read.
            # botocore's default CRC32 of each body on top costs CPU for nothing.
            request_checksum_calculation="when_required", response_checksum_validation="when_required")
        try:
            self.client = session.client("s3", endpoint_url=endpoint_url, config=config)
        except botocore.exceptions.BotoCoreError as exc:  # half of a key pair in the environment, say
            raise StoreUnavailableError(f"{self.describe_location()}: {exc}") from None
        retry.count_client_retries(self.client)
        self.client.meta.events.register_first("request-created.s3", _not_sending)
        self.client.meta.events.register_last("request-created.s3", _sending)
        # Object reads and single PUTs (the hot paths) skip botocore's client pipeline: see s3http.
        self._direct = None
        if SignedRequests.usable(endpoint_url):
            try:
                self._direct = SignedRequests(self.client, core, bucket, connections)
            except botocore.exceptions.BotoCoreError as exc:  # no credentials (yet): botocore's requests say so
                log.info("%s: requests go through botocore (%s)", self.describe_location(), exc)

    def describe_location(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3 bucket {self.bucket}{where}"

    def put(self, key: str, source: Path, size: int, md5: str, description: dict[str, str],
            sent: Callable[[int], None] | None = None) -> bool:
        with self._errors(key, "upload"):
            metadata = self._metadata(key, description)
            if size >= self.multipart_threshold:
                self._put_multipart(key, source, metadata, sent)
            else:
                content_md5 = base64.b64encode(bytes.fromhex(md5)).decode()
                with open(source, "rb") as f:
                    body = FileSlice(f, 0, size, sent)
                    response = self._direct_put(key, body, size, content_md5, metadata)
                    if response is None:
                        response = self.client.put_object(Bucket=self.bucket, Key=key, Body=body,
                                                          Metadata=metadata, ContentMD5=content_md5)
                try:
                    if check_etag(f"upload of {key} to {self.describe_location()}", response, md5):
                        return True
                except VerificationError:
                    self.client.delete_object(Bucket=self.bucket, Key=key)  # no row calls it uploaded
                    raise
            stored = self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
        if stored != size:
            raise VerificationError(f"upload of {key}: {self.bucket} holds {stored} bytes, expected {size}")
        return False

    def _metadata(self, key: str, description: dict[str, str]) -> dict[str, str]:
        """The object's user metadata: its description, within S3's 2 KB. A path too long for them
        (percent-encoded, a path of 4,095 bytes can take 12 KB) goes into a small object beside it,
        ``<key>.path`` (the path as UTF-8 text), named by ``s3repo-path-object``. That one is written
        first: an object never lacks its path, at worst a crash leaves a path object alone."""
        metadata = {META_PREFIX + k: v for k, v in description.items()}
        if "path" not in description or _metadata_size(metadata) <= S3_METADATA_LIMIT:
            return metadata
        path_key = key + PATH_OBJECT_SUFFIX
        self.client.put_object(Bucket=self.bucket, Key=path_key, Body=unquote(description["path"]).encode(),
                               ContentType="text/plain; charset=utf-8")
        del metadata[META_PREFIX + "path"]
        metadata[META_PREFIX + "path-object"] = quote(path_key, safe="/")
        return metadata

    def _direct_put(self, key: str, body: FileSlice, size: int, content_md5: str,
                    metadata: dict[str, str]) -> dict[str, str | None] | None:
        """The signed PUT's answer, or None if botocore must do it (no direct path, or the bucket is
        elsewhere: the body is rewound for it)."""
        if self._direct is None:
            return None
        try:
            return self._direct.put(key, body, size, content_md5, metadata)
        except _client_error_type() as exc:
            if not self._elsewhere(exc):
                raise
            body.seek(0)
            return None

    def _elsewhere(self, exc: Exception) -> bool:
        """Does the server redirect us (the bucket is in another region than configured)? Then the
        signed requests stop, and botocore, which follows such redirects, makes every request."""
        code = exc.response.get("Error", {}).get("Code", "")
        if code not in ("PermanentRedirect", "TemporaryRedirect", "AuthorizationHeaderMalformed", "301", "307"):
            return False
        log.info("%s answers %s to signed requests: botocore makes them from now on (set s3_region)",
                 self.describe_location(), code)
        self._direct = None
        return True

    def _put_multipart(self, key: str, source: Path, metadata: dict[str, str],
                       sent: Callable[[int], None] | None) -> None:
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key, Metadata=metadata)["UploadId"]
        size = source.stat().st_size
        offsets = range(0, size, self.multipart_chunksize)

        def upload_part(number_offset: tuple[int, int]) -> dict:
            number, offset = number_offset
            with open(source, "rb") as f:
                part = FileSlice(f, offset, min(self.multipart_chunksize, size - offset), sent)
                digest = part.md5()
                response = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                   PartNumber=number, Body=part,
                                                   ContentMD5=base64.b64encode(digest).decode())
            check_etag(f"upload of part {number} of {key}", response, digest.hex())
            return {"PartNumber": number, "ETag": response["ETag"]}

        try:
            with ThreadPoolExecutor(self.concurrency) as pool:
                parts = list(pool.map(upload_part, enumerate(offsets, start=1)))
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                  MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception as exc:  # the original failure matters more; gc cleans leftovers
                log.warning("could not abort multipart upload of %s: %s", key, exc)
            raise

    def stream(self, key: str, start: int, end: int, size: int) -> Iterator[bytes]:
        if start >= end:
            return
        # No Range header for a whole object: some servers (moto) copy the object for every range.
        ranged = {} if (start, end) == (0, size) else {"Range": f"bytes={start}-{end - 1}"}
        # A reader waiting for the first bytes gets them before a whole chunk has arrived.
        chunks = _chunk_sizes(end - start)
        with self._errors(key, "download"):
            if self._direct is not None:
                try:
                    yield from self._direct.stream(key, ranged, chunks)
                    return
                except _client_error_type() as exc:  # raised before any byte is yielded
                    if not self._elsewhere(exc):
                        raise
            body = self.client.get_object(Bucket=self.bucket, Key=key, **ranged)["Body"]
            try:
                for step in chunks:
                    if not (chunk := body.read(step)):
                        break
                    yield chunk
            finally:
                body.close()

    def head(self, key: str) -> ObjectInfo | None:
        try:
            with self._errors(key, "head"):
                response = self.client.head_object(Bucket=self.bucket, Key=key)
        except ObjectMissingError:
            return None
        description = read_description({k[len(META_PREFIX):]: v for k, v in response.get("Metadata", {}).items()
                                        if k.startswith(META_PREFIX)})
        if "path-object" in description and "path" not in description:
            with suppress(ObjectMissingError), self._errors(key, "head"):
                body = self.client.get_object(Bucket=self.bucket, Key=description["path-object"])["Body"]
                description["path"] = body.read().decode()
        return ObjectInfo(key, response["ContentLength"], description, response.get("StorageClass", "STANDARD"),
                          response["LastModified"].timestamp(), restore_ongoing(response.get("Restore")))

    def delete(self, key: str) -> None:
        with self._errors(key, "delete"):
            self.client.delete_object(Bucket=self.bucket, Key=key)
            if not key.endswith(PATH_OBJECT_SUFFIX):  # its path object, if its path was too long (a no-op if not)
                self.client.delete_object(Bucket=self.bucket, Key=key + PATH_OBJECT_SUFFIX)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        with self._errors(prefix or "(all)", "list"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    if not item["Key"].endswith(PATH_OBJECT_SUFFIX):  # part of the object it is named after
                        yield ObjectInfo(item["Key"], item["Size"], {}, item.get("StorageClass", "STANDARD"),
                                         item["LastModified"].timestamp())

    def set_storage_class(self, key: str, storage_class: str, size: int) -> None:
        """An in-place copy into ``storage_class``: one CopyObject, its metadata copied, up to S3's 5 GiB
        limit; above it, boto3's managed copy (UploadPartCopy, the metadata passed on: S3 copies none
        into a multipart upload)."""
        source = {"Bucket": self.bucket, "Key": key}
        with self._errors(key, "copy"):
            if size <= COPY_OBJECT_LIMIT:
                self.client.copy_object(Bucket=self.bucket, Key=key, CopySource=source, StorageClass=storage_class,
                                        MetadataDirective="COPY")
                return
            from boto3.s3.transfer import TransferConfig

            metadata = self.client.head_object(Bucket=self.bucket, Key=key).get("Metadata", {})
            self.client.copy(source, self.bucket, key, Config=TransferConfig(
                multipart_threshold=COPY_OBJECT_LIMIT, multipart_chunksize=COPY_PART_SIZE,
                max_concurrency=self.concurrency),
                ExtraArgs={"StorageClass": storage_class, "Metadata": metadata, "MetadataDirective": "REPLACE"})

    def request_restore(self, key: str, days: int) -> None:
        """RestoreObject at the Standard retrieval tier (hours; Bulk and Expedited are not offered)."""
        with self._errors(key, "restore"):
            try:
                self.client.restore_object(Bucket=self.bucket, Key=key, RestoreRequest={
                    "Days": days, "GlacierJobParameters": {"Tier": "Standard"}})
            except _client_error_type() as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code == "RestoreAlreadyInProgress":
                    return
                if code == "InvalidObjectState":  # here: S3's answer for an object in no archive class
                    raise RepoError(f"object {key} in {self.describe_location()} is not in an archive storage "
                                    "class") from None
                raise

    def check_access(self) -> None:
        """Fail with a clear StoreUnavailableError unless the bucket exists and our credentials work."""
        with self._errors("(bucket)", "access"):
            self.client.head_bucket(Bucket=self.bucket)

    @contextmanager
    def _errors(self, key: str, action: str) -> Iterator[None]:
        """The one table from boto3's failures to repository errors; and the one place every operation is
        timed (``s3repofs_s3_request_seconds``, by ``action``)."""
        import botocore.exceptions as bex
        import urllib3

        where = self.describe_location()
        started = time.perf_counter()
        try:
            yield
        except RepoError:
            raise
        except bex.ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                if action == "access":
                    raise StoreUnavailableError(f"{where} does not exist") from None
                raise ObjectMissingError(f"object {key} is missing from {where}") from None
            if code == "NoSuchBucket":
                raise StoreUnavailableError(f"{where} does not exist") from None
            if code in ("BadDigest", "InvalidDigest", "EntityTooSmall"):
                raise VerificationError(f"{action} of {key} to {where} failed verification: {code}") from None
            if code == "InvalidObjectState":
                raise ArchivedError(f"object {key} is archived in {where}; restore (thaw) it first") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise StoreUnavailableError(f"{where} refused the {action} of {key}: {code} "
                                            "(check the S3 credentials and permissions)") from None
            detail = f"{code} {error.get('Message', '')}".rstrip()
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            failure = TransientStoreError if retry.transient_answer(status, code) else StoreUnavailableError
            raise failure(f"{action} of {key} failed at {where}: {detail}") from None
        except bex.NoCredentialsError:
            raise StoreUnavailableError(f"no S3 credentials for {where}: set s3_access_key/s3_secret_key "
                                        "or configure boto3's credential chain") from None
        except (bex.IncompleteReadError, bex.ResponseStreamingError, bex.ReadTimeoutError) as exc:
            raise TransientStoreError(f"the {action} of {key} from {where} broke off: {exc}") from None
        except bex.ConnectionClosedError as exc:
            raise TransientStoreError(f"cannot reach {where}: {exc}") from None
        except (bex.EndpointConnectionError, bex.ConnectTimeoutError) as exc:
            raise StoreUnavailableError(f"cannot reach {where}: {exc}") from None
        except bex.BotoCoreError as exc:
            raise StoreUnavailableError(f"{action} of {key} failed at {where}: {exc}") from None
        except urllib3.exceptions.MaxRetryError as exc:  # the signed requests of s3http, retried already
            # Closed without an answer or stalled (transient), or refused, timed out connecting.
            broken = isinstance(exc.reason, (urllib3.exceptions.ProtocolError, urllib3.exceptions.ReadTimeoutError))
            raise (TransientStoreError if broken else StoreUnavailableError)(
                f"cannot reach {where}: {exc.reason}") from None
        except urllib3.exceptions.HTTPError as exc:  # raised reading a body: urllib3 retries the rest
            detail = exc.args[0] if exc.args and isinstance(exc.args[0], str) else exc
            raise TransientStoreError(f"the {action} of {key} from {where} broke off: {detail}") from None
        except OSError as exc:
            raise StoreUnavailableError(f"{action} of {key} at {where}: {exc.strerror or exc}") from None
        finally:
            metrics.S3_SECONDS.labels(action).observe(time.perf_counter() - started)


def _client_error_type() -> type:
    import botocore.exceptions  # loaded with boto3 by S3Store; the local store never needs it

    return botocore.exceptions.ClientError


def check_etag(what: str, answer: dict, md5: str) -> bool:
    """Does the ETag of a PUT's ``answer`` (botocore's names) prove that the server stored the bytes
    whose md5 we sent? VerificationError if it proves otherwise; False if it cannot tell (the
    caller checks the size instead).

    Servers should refuse a body that does not match its Content-MD5, but not all do (moto and
    s3rver store it anyway), so the answer is checked too: the ETag of a single PUT or part is the
    md5 of what was stored, except for SSE-KMS and SSE-C objects and servers whose ETags have
    another form."""
    etag = str(answer.get("ETag", "")).strip('"')
    sse_kms = str(answer.get("ServerSideEncryption") or "").startswith("aws:kms")
    if sse_kms or answer.get("SSECustomerAlgorithm") or not _MD5_HEX.fullmatch(etag):
        return False
    if etag != md5:
        raise VerificationError(f"{what}: the server stored bytes with md5 {etag}, "
                                f"not the {md5} sent")
    return True


def restore_ongoing(header: str | None) -> bool | None:
    """S3's ``x-amz-restore`` header, read: None without one (no restore asked for, or its copy expired),
    True for ``ongoing-request="true"``, False once the restored copy is readable."""
    if not header:
        return None
    return 'ongoing-request="true"' in header


def _chunk_sizes(length: int) -> Iterator[int]:
    """The sizes to read ``length`` bytes in: FIRST_CHUNK, then CHUNKs (the last one short)."""
    step = FIRST_CHUNK
    while length > 0:
        yield min(step, length)
        length -= step
        step = CHUNK
