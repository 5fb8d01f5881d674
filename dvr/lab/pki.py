"""A small PKI for a lab's databases, made with the `openssl` command as `ovs-pki` makes
one: a CA, and for each name a private key and a certificate whose CN is the name (a
node's, or `admin` for operators' tools). The files, in the PKI's directory:

    cacert.pem                        the CA's certificate (every server and client trusts it)
    cakey.pem                         the CA's private key (mode 0600)
    NAME-privkey.pem, NAME-cert.pem   NAME's key (mode 0600) and certificate

Keys are ECDSA P-256: each takes milliseconds to make, so a lab's PKI costs nothing.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

CURVE = "prime256v1"
CA_DAYS = 3650
CERT_DAYS = 365


class PkiError(Exception):
    pass


def _openssl(*args: str, stdin: str | None = None) -> str:
    try:
        out = subprocess.run(["openssl", *args], input=stdin, capture_output=True,
                             text=True, check=False)
    except FileNotFoundError:
        raise PkiError("openssl is not installed") from None
    if out.returncode != 0:
        raise PkiError(f"openssl {args[0]}: {out.stderr.strip().splitlines()[-1:]}")
    return out.stdout


def _write_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", f"ec_paramgen_curve:{CURVE}",
             "-out", str(tmp))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class Pki:
    def __init__(self, directory: Path):
        self.dir = Path(directory)

    @property
    def cacert(self) -> Path:
        return self.dir / "cacert.pem"

    @property
    def cakey(self) -> Path:
        return self.dir / "cakey.pem"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}-privkey.pem"

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}-cert.pem"

    def files(self, name: str) -> tuple[str, str, str]:
        """(private key, certificate, CA certificate) of `name`, as clients take them."""
        return str(self.key(name)), str(self.cert(name)), str(self.cacert)

    def ensure_ca(self, subject: str = "dvr lab CA") -> None:
        if self.cacert.exists() and self.cakey.exists():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        _write_key(self.cakey)
        tmp = self.cacert.with_name("cacert.pem.tmp")
        _openssl("req", "-x509", "-new", "-key", str(self.cakey), "-subj", f"/CN={subject}",
                 "-days", str(CA_DAYS), "-sha256", "-addext",
                 "basicConstraints=critical,CA:TRUE", "-addext",
                 "keyUsage=critical,keyCertSign,cRLSign", "-out", str(tmp))
        os.replace(tmp, self.cacert)

    def issue(self, name: str, days: int = CERT_DAYS, new_key: bool = True) -> None:
        """A certificate for `name` (CN=name), valid for `days` from now (a negative
        number: already expired); with `new_key`, a fresh private key too. The files are
        replaced atomically, the key first: a reader sees the old pair or the new one."""
        self.ensure_ca()
        key = self.key(name)
        staging = self.dir / f".{name}-new-privkey.pem"
        if new_key or not key.exists():
            _write_key(staging)
        else:
            staging = key
        with tempfile.TemporaryDirectory(dir=self.dir) as tmpdir:
            csr = Path(tmpdir) / "req.csr"
            ext = Path(tmpdir) / "ext.cnf"
            ext.write_text("basicConstraints=CA:FALSE\n"
                           "keyUsage=critical,digitalSignature,keyAgreement\n"
                           "extendedKeyUsage=serverAuth,clientAuth\n")
            _openssl("req", "-new", "-key", str(staging), "-subj", f"/CN={name}",
                     "-out", str(csr))
            tmp = Path(tmpdir) / "cert.pem"
            _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.cacert),
                     "-CAkey", str(self.cakey), "-set_serial",
                     str(int.from_bytes(os.urandom(8), "big")), "-days", str(days),
                     "-sha256", "-extfile", str(ext), "-out", str(tmp))
            if staging != key:
                os.replace(staging, key)
            os.replace(tmp, self.cert(name))

    def ensure(self, names: list[str]) -> None:
        """The CA and a key and certificate for each of `names` (those missing)."""
        self.ensure_ca()
        for name in names:
            if not (self.key(name).exists() and self.cert(name).exists()):
                self.issue(name)


def subject_cn(cert: Path) -> str:
    out = _openssl("x509", "-in", str(cert), "-noout", "-subject", "-nameopt", "multiline")
    for line in out.splitlines():
        k, _, v = line.strip().partition("=")
        if k.strip() == "commonName":
            return v.strip()
    raise PkiError(f"{cert}: no CN")


def main(argv: list[str] | None = None) -> int:
    """`python3 -m dvr.lab.pki DIR NAME...`: the CA in DIR and a certificate for each NAME
    that has none (vagrant/lab.sh makes the Vagrant lab's PKI so)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print("usage: python3 -m dvr.lab.pki DIR NAME...", file=sys.stderr)
        return 2
    try:
        Pki(Path(args[0])).ensure(args[1:])
    except PkiError as exc:
        print(f"dvr.lab.pki: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
