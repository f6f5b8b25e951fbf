"""Serves the mount's metrics where ``-o metrics=`` asks: an HTTP endpoint, or a textfile for node_exporter.

``metrics=HOST:PORT`` (``[::1]:9567`` for IPv6) serves ``/metrics`` over HTTP at that address only:
``127.0.0.1`` keeps it on this host. ``metrics=/abs/path.prom`` writes the same text to that file every
``TEXTFILE_INTERVAL`` s, atomically (a temp file renamed over it), for node_exporter's textfile collector,
and removes it at unmount, so a stopped mount's figures are not reported as current. Without the
option, nothing is served and no port is opened (``s3repofs stats`` reads the control file instead).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import prometheus_client

from .. import metrics
from ..errors import UnavailableError, UsageError

log = logging.getLogger("s3repofs.mount")

TEXTFILE_INTERVAL = 15.0  # seconds; node_exporter reads the file at each of its own scrapes


@dataclass(frozen=True)
class Target:
    """Where the metrics go: an address (``host``, ``port``) or a textfile (``path``)."""

    host: str = ""
    port: int = 0
    path: Path | None = None

    def describe(self) -> str:
        return str(self.path) if self.path else f"http://{_bracketed(self.host)}:{self.port}/metrics"


def parse_target(text: str | bool | None) -> Target | None:
    """The value of ``-o metrics=``: HOST:PORT or an absolute path; None without the option. UsageError
    for anything else (checked before the daemon starts, so the mount command says what is wrong)."""
    if text is None:
        return None
    if not isinstance(text, str) or not text:
        raise UsageError("-o metrics= takes HOST:PORT (e.g. 127.0.0.1:9567) or the absolute path of a .prom file")
    if text.startswith("/"):
        return Target(path=Path(text))
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"-o metrics={text}: not HOST:PORT (e.g. 127.0.0.1:9567) nor an absolute path")
    return Target(host=host, port=int(port))


class MetricsExportError(UnavailableError):
    """The endpoint cannot listen where it was asked (the port is taken, say)."""


class Exporter:
    """Serves ``metrics.REGISTRY`` at its target from ``start`` until ``stop``."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._server = None
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None

    def start(self) -> None:
        if self.target.path is None:
            try:
                self._server, _thread = prometheus_client.start_http_server(
                    self.target.port, self.target.host, registry=metrics.REGISTRY)
            except OSError as exc:
                raise MetricsExportError(f"metrics endpoint {self.target.describe()}: "
                                         f"{exc.strerror or exc}") from None
        else:
            self._write()  # at once: a bad directory fails the mount, not a thread later
            self._writer = threading.Thread(target=self._keep_writing, name="metrics-textfile", daemon=True)
            self._writer.start()
        log.info("metrics at %s", self.target.describe())

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._writer is not None:
            self._stop.set()
            self._writer.join()
            self.target.path.unlink(missing_ok=True)

    def _keep_writing(self) -> None:
        while not self._stop.wait(TEXTFILE_INTERVAL):
            try:
                self._write()
            except MetricsExportError as exc:  # a full disk, say: the next round tries again
                log.warning("%s", exc)

    def _write(self) -> None:
        try:
            prometheus_client.write_to_textfile(str(self.target.path), metrics.REGISTRY)
        except OSError as exc:
            raise MetricsExportError(f"metrics textfile {self.target.path}: {exc.strerror or exc}") from None


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
