"""Signed S3 requests without botocore's client pipeline, for the hot paths: reading an object's bytes
and putting a whole object.

botocore's ``get_object`` spends ~1.2 ms of CPU per request here (endpoint rules, event hooks,
response parsing), more than the S3 server itself, and a reader of many small files pays it for
every file. Signing the same request with botocore's own SigV4 signer and sending it on a urllib3
pool costs 0.36 ms. A PUT is signed with an unsigned payload: the body is protected by its
Content-MD5, which the server checks, so hashing it a second time with SHA-256 (what botocore does
over plain HTTP) buys nothing. The bucket's address (path or virtual-host style) is taken from
botocore, so both paths reach the same URL; errors are raised as botocore's ``ClientError`` and
urllib3's exceptions, which ``S3Store`` translates in its one table.

Used only where it is plainly equivalent: no proxy applies to the endpoint (botocore would use it).
"""

from __future__ import annotations

import os
import re
import urllib.request
from typing import Any, BinaryIO, Iterator
from urllib.parse import quote, urlsplit

import botocore.exceptions
import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.httpsession import get_cert_path

from . import retry

_ERROR_CODE = re.compile(rb"<Code>([^<]+)</Code>")
_ERROR_MESSAGE = re.compile(rb"<Message>([^<]*)</Message>")


class _UnsignedPayload(S3SigV4Auth):
    def _should_sha256_sign_payload(self, request) -> bool:  # botocore's own subclasses override it too
        return False


class SignedRequests:
    def __init__(self, client: Any, botocore_session: Any, bucket: str, max_connections: int) -> None:
        # The bucket's base URL exactly as botocore addresses it: presign a key and cut it off.
        presigned = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "k"},
                                                  ExpiresIn=60)
        self._base = presigned.split("?", 1)[0][:-1]  # ends with "/"
        self._credentials = botocore_session.get_credentials()
        self._region = client.meta.region_name
        # One pool for the one endpoint, asked with paths: a PoolManager would parse every URL and
        # look its pool up again (~30 us of the ~500 per small GET).
        endpoint = urlsplit(self._base)
        self._path_prefix = endpoint.path
        tls = {}
        if endpoint.scheme == "https":
            # The CA bundle botocore would use: AWS_CA_BUNDLE or the config file, else REQUESTS_CA_BUNDLE.
            verify = botocore_session.get_config_variable("ca_bundle") or os.environ.get("REQUESTS_CA_BUNDLE") or True
            tls = {"ca_certs": get_cert_path(verify)}
        self._pool = urllib3.connection_from_url(
            self._base, maxsize=max_connections, block=False, **tls,
            timeout=urllib3.Timeout(connect=retry.CONNECT_TIMEOUT, read=retry.READ_TIMEOUT),
            retries=retry.urllib3_retries())

    @staticmethod
    def usable(endpoint_url: str | None) -> bool:
        """False if a proxy would apply to the endpoint (botocore honours proxies; this path does not)."""
        host = urlsplit(endpoint_url).hostname if endpoint_url else None
        proxies = urllib.request.getproxies()
        if not proxies:
            return True
        return host is not None and urllib.request.proxy_bypass(host)

    def stream(self, key: str, headers: dict[str, str], chunks: Iterator[int]) -> Iterator[bytes]:
        """GET ``key`` with ``headers`` (a Range, say) and yield its body in pieces of the sizes that
        ``chunks`` yields, until the body ends."""
        path, signed = self._signed("GET", key, headers, S3SigV4Auth)
        # The bytes as stored (as botocore reads them), and each read returns what arrived before the
        # body broke off (a decoding read drops it): the download resumes right after them.
        response = self._pool.urlopen("GET", path, headers=signed, preload_content=False, redirect=False,
                                      decode_content=False)
        complete = False
        try:
            expected = 206 if "Range" in headers else 200
            if response.status in (200, 206) and response.status != expected:  # would send from byte 0
                raise _error_answer(response.status, b"<Code>RangeNotHonoured</Code>", "GetObject")
            if response.status != expected:
                raise _error_answer(response.status, response.read(), "GetObject")
            for size in chunks:
                chunk = response.read(size)
                if chunk:
                    yield chunk
                if len(chunk) < size:  # the body ended: broken off, if its Content-Length says so
                    if response.length_remaining:
                        raise urllib3.exceptions.IncompleteRead(response.tell(), response.length_remaining)
                    break
            complete = True
        finally:
            if complete:
                response.release_conn()  # read to its end: the connection is reused
            else:
                response.close()

    def put(self, key: str, body: BinaryIO, length: int, md5_base64: str,
            metadata: dict[str, str]) -> dict[str, str | None]:
        """PUT ``length`` bytes of ``body`` (seekable: rewound for a retry) as ``key``, with its
        Content-MD5 and user metadata. Returns the answer's ETag, ServerSideEncryption and
        SSECustomerAlgorithm under the names botocore's put_object gives them."""
        headers = {"Content-Length": str(length), "Content-MD5": md5_base64,
                   **{f"x-amz-meta-{name}": value for name, value in metadata.items()}}
        path, signed = self._signed("PUT", key, headers, _UnsignedPayload)
        response = self._pool.urlopen("PUT", path, body=body, headers=signed, redirect=False)
        if response.status != 200:
            raise _error_answer(response.status, response.data, "PutObject")
        answered = response.headers
        return {"ETag": answered.get("ETag", ""),
                "ServerSideEncryption": answered.get("x-amz-server-side-encryption"),
                "SSECustomerAlgorithm": answered.get("x-amz-server-side-encryption-customer-algorithm")}

    def _signed(self, method: str, key: str, headers: dict[str, str], auth: type) -> tuple[str, dict[str, str]]:
        """The request's path on the endpoint, and its headers with the signature."""
        quoted = quote(key, safe="/~")
        request = AWSRequest(method=method, url=self._base + quoted, headers=headers)
        credentials = self._credentials.get_frozen_credentials() if self._credentials else None
        if credentials is None:
            raise botocore.exceptions.NoCredentialsError()
        auth(credentials, "s3", self._region).add_auth(request)
        return self._path_prefix + quoted, dict(request.headers.items())


def _error_answer(status: int, body: bytes, operation: str) -> botocore.exceptions.ClientError:
    code = _ERROR_CODE.search(body)
    message = _ERROR_MESSAGE.search(body)
    error = {"Code": code.group(1).decode() if code else str(status),
             "Message": message.group(1).decode(errors="replace") if message else ""}
    return botocore.exceptions.ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}},
                                           operation)
