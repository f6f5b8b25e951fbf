"""Tells systemd what the mount's daemon is doing: sd_notify(3) messages on the socket $NOTIFY_SOCKET names.

Our own few lines rather than a dependency: the protocol is one datagram of ``KEY=value`` lines on a Unix
socket (an abstract one when the name starts with '@'), and the libraries that speak it either need
libsystemd's headers to build (systemd-python) or are no longer maintained (sdnotify). Without
$NOTIFY_SOCKET (not started by systemd as ``Type=notify``) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("s3repofs.mount")


class Notifier:
    """Sends READY=1, STATUS=..., STOPPING=1 to the service manager; never raises (a lost status line must not
    stop the mount)."""

    def __init__(self, socket_name: str | None = None) -> None:
        name = os.environ.get("NOTIFY_SOCKET", "") if socket_name is None else socket_name
        # '@name' is Linux's abstract namespace, which the socket API spells with a leading NUL byte.
        self.address = "\0" + name[1:] if name.startswith("@") else name if name.startswith("/") else ""

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def send(self, *lines: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            log.warning("cannot tell systemd %r: %s", lines[0], exc)
