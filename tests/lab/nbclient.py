"""A northbound database client for the TLS and RBAC tests, run inside a lab namespace:

    python -m tests.lab.nbclient REMOTE [--key K --cert C --ca CA] [--no-cert] [--plain]
                                 [OPS_JSON]

connects to REMOTE (tcp:IP:PORT; TLS unless --plain), with the identity given (or, with
--no-cert, none at all), and sends one `transact` of OPS_JSON on DVR_Northbound (or
`list_dbs` without it). Prints one JSON object: {"stage": "connect" | "handshake" |
"answer", "error": ..., "result": ...}: where it stopped, and why.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys
from typing import Any


def attempt(args: argparse.Namespace) -> dict[str, Any]:
    host, _, port = args.remote.partition(":")[2].rpartition(":")
    try:
        sock = socket.create_connection((host, int(port)), timeout=args.timeout)
    except OSError as exc:
        return {"stage": "connect", "error": exc.strerror or str(exc)}
    if not args.plain:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(args.ca)
        if not args.no_cert:
            ctx.load_cert_chain(args.cert, args.key)
        try:
            sock = ctx.wrap_socket(sock)
        except (ssl.SSLError, OSError) as exc:
            return {"stage": "handshake", "error": str(exc)}
    ops = json.loads(args.ops) if args.ops else None
    msg = ({"method": "transact", "params": ["DVR_Northbound", *ops], "id": 1} if ops
           else {"method": "list_dbs", "params": [], "id": 1})
    buf = b""
    try:
        sock.sendall(json.dumps(msg).encode())
        decoder = json.JSONDecoder()
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                return {"stage": "handshake" if not args.plain else "answer",
                        "error": "connection closed" + (f" after {buf[:40]!r}" if buf else "")}
            buf += chunk
            try:
                reply, _ = decoder.raw_decode(buf.decode())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if reply.get("method") == "echo":
                buf = b""
                continue
            return {"stage": "answer", "error": reply.get("error"),
                    "result": reply.get("result")}
    except ssl.SSLError as exc:  # TLS 1.3: a refused client certificate shows here
        return {"stage": "handshake", "error": str(exc)}
    except OSError as exc:
        return {"stage": "answer" if args.plain else "handshake",
                "error": exc.strerror or str(exc)}
    finally:
        sock.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("remote")
    p.add_argument("ops", nargs="?")
    p.add_argument("--key")
    p.add_argument("--cert")
    p.add_argument("--ca")
    p.add_argument("--no-cert", action="store_true")
    p.add_argument("--plain", action="store_true")
    p.add_argument("--timeout", type=float, default=5.0)
    print(json.dumps(attempt(p.parse_args())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
