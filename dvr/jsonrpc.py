"""A small blocking JSON-RPC client for OVSDB servers (RFC 7047), on the standard library.

The `ovs` bindings parse JSON in pure Python unless their C extension is built against
libopenvswitch, which Debian does not package: a 3 MB reply (a cloud of 10,000 ports) takes
them about 2 s to parse, the standard library's decoder 0.1 s. `dvr nb` talks to the
database through this client; agents keep the `ovs` IDL (they replicate only their share).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import ssl
from typing import Any

from agent import tls

RECV_SIZE = 1 << 20


class RpcError(OSError):
    """The connection failed or was closed: an answer may have been lost."""


class Connection:
    """One connection to `unix:PATH`, `tcp:HOST:PORT` or `ssl:HOST:PORT` (with the
    process's TLS identity, `agent.tls`); `call()` sends a request and
    returns its answer, answering the server's echo (keepalive) requests meanwhile."""

    def __init__(self, remote: str, timeout: float):
        self.remote = remote
        kind, _, where = remote.partition(":")
        try:
            if kind == "unix":
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(where)
            elif kind in ("tcp", "ssl"):
                host, _, port = where.rpartition(":")
                ctx = tls.client_context() if kind == "ssl" else None
                sock = socket.create_connection((host.strip("[]"), int(port)),
                                                timeout=timeout)
                if ctx is not None:
                    try:
                        sock = ctx.wrap_socket(sock)   # the handshake, within the timeout
                    except ssl.SSLError as exc:
                        sock.close()
                        raise RpcError(f"TLS handshake refused: {exc.reason or exc}") from None
                    except OSError:
                        sock.close()
                        raise
                self.sock = sock
            else:
                raise RpcError(f"{remote}: not a unix:PATH, tcp:HOST:PORT or ssl:HOST:PORT "
                               "remote")
        except tls.TlsError as exc:
            raise RpcError(str(exc)) from None
        except (OSError, ValueError) as exc:
            if isinstance(exc, RpcError):
                raise
            if isinstance(exc, ssl.SSLError):
                raise RpcError(f"TLS: {exc.reason or exc}") from None
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise RpcError(reason) from None
        self._buf = b""
        self._ids = itertools.count(1)
        self._decoder = json.JSONDecoder()

    def close(self) -> None:
        self.sock.close()

    def call(self, method: str, params: list[Any], timeout: float = 120.0
             ) -> tuple[Any, Any]:
        """(result, error) of one request; RpcError when the connection fails."""
        ident = next(self._ids)
        self.sock.settimeout(timeout)
        self._send({"method": method, "params": params, "id": ident})
        while True:
            msg = self._recv()
            if msg.get("method") == "echo" and msg.get("id") is not None:
                self._send({"result": msg.get("params", []), "error": None,
                            "id": msg["id"]})
            elif msg.get("id") == ident and "method" not in msg:
                return msg.get("result"), msg.get("error")

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            self.sock.sendall(json.dumps(msg, separators=(",", ":")).encode())
        except OSError as exc:
            raise RpcError(exc.strerror or str(exc)) from None

    def _recv(self) -> dict[str, Any]:
        """The next message. Messages follow each other with no separator: a decode is
        tried when the stream pauses on a closing brace (a message's last byte), so a
        large reply is decoded about once, not once per chunk."""
        while True:
            text = self._buf.lstrip()
            if text and text.rstrip().endswith(b"}"):
                whole = text.decode()
                try:
                    msg, end = self._decoder.raw_decode(whole)
                except json.JSONDecodeError:
                    pass  # not complete yet
                else:
                    self._buf = whole[end:].encode()
                    if not isinstance(msg, dict):
                        raise RpcError(f"{self.remote}: not a JSON-RPC message")
                    return msg
            try:
                chunk = self.sock.recv(RECV_SIZE)
            except OSError as exc:
                raise RpcError(exc.strerror or str(exc) or "timed out") from None
            if not chunk:
                raise RpcError(os.strerror(32) if self._buf else "connection closed")
            self._buf = text + chunk
