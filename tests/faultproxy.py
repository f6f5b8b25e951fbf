"""A fault-injecting HTTP proxy for S3 tests: sits between a client and moto's server on loopback and
spoils a share of the requests the way networks and S3 do.

    with FaultProxy(s3_server.endpoint_url, rate=0.2, seed=7) as proxy:
        config["s3_endpoint_url"] = proxy.endpoint_url
        ...
        proxy.configure(rate=0.0)               # quiet for a while
        assert proxy.injected["truncate"] > 0   # what was done, by kind

Per request, with probability ``rate`` (a seeded RNG), one of ``kinds`` happens:

- ``503``: answered SlowDown without forwarding (the server refused it).
- ``500``: forwarded, then answered InternalError (the server may have done the work).
- ``drop``: forwarded, then the connection is closed without an answer.
- ``truncate``: the real answer's headers (Content-Length kept) and part of its body, then the
  connection is closed (an answer without a body is dropped instead).
- ``corrupt``: the real answer with one byte of its body flipped (nothing to flip in an empty body).
- ``latency``: the real answer after ``min_latency`` (0 by default) to ``max_latency`` seconds.

``methods`` limits the faults to some HTTP methods (all by default); ``at_most_once`` spoils the
requests of each object (method and path) at most once, so that a retry passes: a test of one kind
of fault then does not depend on the luck of the draw. stdlib only: the proxy forwards
each request as it came (its Host header too, which the client signed) and reads the whole answer
before sending it on, so it suits objects of a few MiB, not benchmarks.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable
from urllib.parse import urlsplit

KINDS = ("503", "500", "drop", "truncate", "corrupt", "latency")
ALL_METHODS = None
_KEEP = object()
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}
_ERROR = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>injected by the fault '
          'proxy</Message></Error>')


class FaultProxy:
    def __init__(self, upstream: str, *, rate: float = 0.0, kinds: Iterable[str] = KINDS,
                 methods: Iterable[str] | None = ALL_METHODS, at_most_once: bool = False, seed: int = 0,
                 max_latency: float = 0.2, min_latency: float = 0.0) -> None:
        target = urlsplit(upstream)
        self.upstream = (target.hostname or "127.0.0.1", target.port or 80)
        self.injected: Counter[str] = Counter()  # kind -> how many requests it spoiled
        self.requests = 0
        self.max_latency = max_latency
        self.min_latency = min_latency
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._spoiled: set[tuple[str, str]] = set()  # (method, path) spoiled already (at_most_once)
        self.configure(rate=rate, kinds=kinds, methods=methods, at_most_once=at_most_once)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def configure(self, *, rate: float | None = None, kinds: Iterable[str] | None = None,
                  methods: Iterable[str] | None | object = _KEEP, at_most_once: bool | None = None) -> None:
        """Change the share of spoiled requests, the kinds of fault, the methods they hit
        (ALL_METHODS: every one), or whether an object's requests are spoiled at most once."""
        with self._lock:
            if rate is not None:
                self.rate = rate
            if kinds is not None:
                self.kinds = tuple(kinds)
                unknown = set(self.kinds) - set(KINDS)
                if unknown or not self.kinds:
                    raise ValueError(f"fault kinds must be some of {KINDS}, not {sorted(unknown)}")
            if methods is not _KEEP:
                self.methods = None if methods is None else {m.upper() for m in methods}
            if at_most_once is not None:
                self.at_most_once = at_most_once

    def reset(self, seed: int = 0) -> None:
        """No faults, every kind and method, counters at zero, the RNG seeded anew."""
        self.configure(rate=0.0, kinds=KINDS, methods=ALL_METHODS, at_most_once=False)
        with self._lock:
            self._rng.seed(seed)
            self._spoiled.clear()
            self.injected.clear()
            self.requests = 0

    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _draw(self, method: str, path: str) -> tuple[str | None, float]:
        """The fault for the next request (None: none), and a number for where it strikes."""
        with self._lock:
            self.requests += 1
            where = self._rng.random()
            request = (method, path)
            if (self.methods is not None and method not in self.methods) or self._rng.random() >= self.rate:
                return None, where
            if self.at_most_once:
                if request in self._spoiled:
                    return None, where
                self._spoiled.add(request)
            kind = self._rng.choice(self.kinds)
            self.injected[kind] += 1
            return kind, where


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
        _upstream: http.client.HTTPConnection | None = None

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            fault, where = proxy._draw(self.command, self.path)
            if fault == "503":
                return self._answer_error(503, "SlowDown")
            if fault == "latency":
                time.sleep(proxy.min_latency + where * max(0.0, proxy.max_latency - proxy.min_latency))
            status, headers, answer = self._forward(body)
            if fault == "500":
                return self._answer_error(500, "InternalError")
            if fault == "drop" or (fault == "truncate" and not answer):
                self.close_connection = True
                return
            if fault == "corrupt" and answer:
                spoiled = bytearray(answer)
                spoiled[int(where * len(answer))] ^= 0x01
                answer = bytes(spoiled)
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            if fault == "truncate":
                self.wfile.write(answer[:int(where * len(answer))])
                self.close_connection = True
            elif self.command != "HEAD":
                self.wfile.write(answer)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        def _forward(self, body: bytes | None) -> tuple[int, list[tuple[str, str]], bytes]:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            for attempt in (1, 2):  # a kept-alive upstream connection may have been closed meanwhile
                if self._upstream is None:
                    self._upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    self._upstream.request(self.command, self.path, body=body, headers=headers)
                    response = self._upstream.getresponse()
                    answer = response.read()
                    break
                except (http.client.HTTPException, OSError):
                    self._upstream.close()
                    self._upstream = None
                    if attempt == 2:
                        raise
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP | {"server", "date"}]
            if self.command != "HEAD":
                kept = [(k, v) for k, v in kept if k.lower() != "content-length"]
                kept.append(("Content-Length", str(len(answer))))
            return response.status, kept, answer

        def _answer_error(self, status: int, code: str) -> None:
            error = _ERROR.format(code=code).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(error)

        def finish(self) -> None:
            if self._upstream is not None:
                self._upstream.close()
            super().finish()

    return Handler
