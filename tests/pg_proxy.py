"""A TCP proxy in front of PostgreSQL that can lose the answer to a query the server has run.

This is how a client meets a lost commit for real: the server receives the query, runs it to the
end (commits) and answers, but the answer never arrives because the connection breaks on the way.
The proxy forwards the query, reads the server's whole answer (up to its ReadyForQuery message),
drops it and closes both connections; psycopg2 then raises the error it raises for a server that
went away, while the transaction is committed.

It speaks just enough of the wire protocol to find message boundaries: the client's first message
has no type byte (connect with sslmode=disable and gssencmode=disable, so it is the startup
message), every other message on either side is a type byte and a length.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading


class AnswerLosingProxy:
    def __init__(self, server_host: str, server_port: int) -> None:
        self._server = (server_host, server_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._lose: list[str] = []  # one entry per answer to lose: a text its query contains
        self.lost = 0  # answers lost so far
        self.refusing = False  # new connections are closed at once, as by a server that is down
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="pg-proxy").start()

    def url(self, url: str) -> str:
        """``url`` (a database of the proxied server) through this proxy."""
        rest = url.split("@", 1)[1].split("/", 1)[1]
        user = url.split("://", 1)[1].split("@", 1)[0]
        return f"postgresql://{user}@127.0.0.1:{self.port}/{rest}?sslmode=disable&gssencmode=disable"

    def lose_answer_to(self, text: str) -> None:
        """Lose the answer to the next query containing ``text`` (after the server has run it)."""
        with self._lock:
            self._lose.append(text)

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            server = socket.create_connection(self._server)
            cut = threading.Event()
            threading.Thread(target=self._upstream, args=(client, server, cut), daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client, cut), daemon=True).start()

    def _upstream(self, client: socket.socket, server: socket.socket, cut: threading.Event) -> None:
        with contextlib.suppress(OSError):
            length = _read(client, 4)
            server.sendall(length + _read(client, struct.unpack("!i", length)[0] - 4))  # startup
            while True:
                header = _read(client, 5)
                body = _read(client, struct.unpack("!i", header[1:])[0] - 4)
                if header[:1] == b"Q" and self._take(body):
                    cut.set()  # before the server can answer
                server.sendall(header + body)
        _close(client, server)

    def _downstream(self, server: socket.socket, client: socket.socket, cut: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while True:
                header = _read(server, 5)
                message = header + _read(server, struct.unpack("!i", header[1:])[0] - 4)
                if not cut.is_set():
                    client.sendall(message)
                elif header[:1] == b"Z":  # the server is done with the query: its answer is lost
                    with self._lock:
                        self.lost += 1
                    break
        _close(client, server)

    def _take(self, query: bytes) -> bool:
        text = query.decode("utf-8", "replace")
        with self._lock:
            for i, wanted in enumerate(self._lose):
                if wanted in text:
                    del self._lose[i]
                    return True
        return False


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise OSError("connection closed")
        data += chunk
    return data


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
