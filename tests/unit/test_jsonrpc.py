"""The JSON-RPC client's framing: messages cut anywhere, several in one read, echo."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from dvr import jsonrpc


def serve(path: Path, script: list[bytes], seen: list[dict]) -> threading.Thread:
    """A one-client server: reads one request, then writes `script` piece by piece, then
    reads whatever comes back."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        request = json.loads(conn.recv(65536))
        seen.append(request)
        for piece in script:
            conn.sendall(piece)
            threading.Event().wait(0.01)
        conn.settimeout(1)
        try:
            data = conn.recv(65536)
            if data:
                seen.append(json.loads(data))
        except OSError:
            pass
        conn.close()
        srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_reply_cut_in_pieces_after_an_echo_request(tmp_path: Path) -> None:
    big = json.dumps({"rows": [{"name": f"vm{i}", "ip": "10.0.0.1"} for i in range(3000)]})
    reply = f'{{"id":1,"result":[{big}],"error":null}}'  # the client's first request is 1
    echo = b'{"id":"echo","method":"echo","params":[]}'
    pieces = [echo + reply[:7].encode()]  # an echo request, then the start of the reply
    body = reply[7:].encode()
    pieces += [body[i:i + 5000] for i in range(0, len(body), 5000)]
    seen: list[dict] = []
    t = serve(tmp_path / "s", pieces, seen)
    conn = jsonrpc.Connection(f"unix:{tmp_path}/s", timeout=5)
    result, error = conn.call("transact", ["DB"])
    conn.close()
    t.join(5)
    assert error is None and len(result[0]["rows"]) == 3000
    assert seen[0]["method"] == "transact" and seen[0]["params"] == ["DB"]
    assert seen[1] == {"result": [], "error": None, "id": "echo"}  # the echo was answered


def test_a_closed_connection_is_an_error_not_a_hang(tmp_path: Path) -> None:
    t = serve(tmp_path / "s", [b'{"id":1,"result":[{"rows":'], [])
    conn = jsonrpc.Connection(f"unix:{tmp_path}/s", timeout=5)
    with pytest.raises(jsonrpc.RpcError):
        conn.call("transact", ["DB"])
    t.join(5)


def test_unknown_remotes_and_dead_servers_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(jsonrpc.RpcError, match="not a unix:PATH, tcp:HOST:PORT or ssl:"):
        jsonrpc.Connection("udp:1.2.3.4:6641", timeout=1)
    with pytest.raises(jsonrpc.RpcError, match="no TLS identity configured"):
        jsonrpc.Connection("ssl:1.2.3.4:6641", timeout=1)
    with pytest.raises(jsonrpc.RpcError, match="No such file"):
        jsonrpc.Connection(f"unix:{tmp_path}/none", timeout=1)
