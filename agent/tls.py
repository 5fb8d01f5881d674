"""The TLS identity of a northbound database client: its private key, its certificate
(whose CN the servers' RBAC takes as who it is) and the CA certificate it trusts.

One per process, as the `ovs` library keeps it: `configure()` sets it for both dvr's own
JSON-RPC client (`dvr nb`, the Neutron driver) and the `ovs` IDL (agents, the scheduler),
for every `ssl:HOST:PORT` remote opened after it. The files are read at each connection,
so a certificate replaced on disk is used from the next connection on; `Watch` tells a
long-lived client when that happened, so that it reconnects.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path


class TlsError(Exception):
    """A client was asked for an ssl: remote without a usable key, certificate or CA."""


@dataclass(frozen=True)
class Identity:
    private_key: str
    certificate: str
    ca_cert: str

    def files(self) -> tuple[str, str, str]:
        return self.private_key, self.certificate, self.ca_cert


_identity: Identity | None = None


def configure(private_key: str | None, certificate: str | None, ca_cert: str | None
              ) -> Identity | None:
    """Set this process's identity; all three files or none. Returns it (None: no TLS,
    ssl: remotes then refused with a clear error)."""
    global _identity
    given = [f for f in (private_key, certificate, ca_cert) if f]
    if not given:
        _identity = None
        return None
    if len(given) != 3:
        raise TlsError("TLS needs all three of the private key, the certificate and the "
                       "CA certificate")
    for f in given:
        if not os.access(f, os.R_OK):
            raise TlsError(f"cannot read {f}")
    _identity = Identity(str(private_key), str(certificate), str(ca_cert))
    import ovs.stream

    ovs.stream.Stream.ssl_set_private_key_file(_identity.private_key)
    ovs.stream.Stream.ssl_set_certificate_file(_identity.certificate)
    ovs.stream.Stream.ssl_set_ca_cert_file(_identity.ca_cert)
    return _identity


def identity() -> Identity | None:
    return _identity


def uses_tls(target: str) -> bool:
    return any(r.strip().startswith("ssl:") for r in target.split(","))


def require(target: str) -> None:
    """Raise TlsError when `target` has an ssl: remote and no identity is configured."""
    if uses_tls(target) and _identity is None:
        raise TlsError(f"{target}: an ssl: remote needs a private key, a certificate and a "
                       "CA certificate (--private-key, --certificate, --ca-cert)")


def client_context() -> ssl.SSLContext:
    """A context for one new connection, from the files as they are now: the server must
    present a certificate of the CA (its name is not checked: members are addressed by
    IP, as ovsdb-server's own clients do), TLS 1.2 at least."""
    if _identity is None:
        raise TlsError("no TLS identity configured (--private-key, --certificate, --ca-cert)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(_identity.ca_cert)
        ctx.load_cert_chain(_identity.certificate, _identity.private_key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load the TLS identity ({_identity.certificate}): "
                       f"{getattr(exc, 'reason', None) or exc}") from None
    return ctx


class Watch:
    """Whether the identity's files changed since the last look (a rotated certificate):
    by each file's inode, size and modification time."""

    def __init__(self, ident: Identity | None):
        self.ident = ident
        self._seen = self._stamp()

    def _stamp(self) -> tuple[tuple[int, int, int], ...]:
        if self.ident is None:
            return ()
        out = []
        for f in self.ident.files():
            try:
                st = Path(f).stat()
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((0, 0, 0))
        return tuple(out)

    def changed(self) -> bool:
        now = self._stamp()
        if now == self._seen:
            return False
        self._seen = now
        return True
