"""Certificates for the TLS tests, made with openssl for one run (never committed): a CA, and certificates
it signs for a server (a DNS name and an IP address) or a client."""

import subprocess
from pathlib import Path

# The DNS name the servers' certificates carry: nginx checks `uwsgi_ssl_name` against DNS names only.
SERVER_NAME = "app.oxwsgi.test"


def require_openssl() -> None:
    # Imported here, not at the top: bench/tls.py makes its certificates with this module too, and the
    # benchmark's Python has no pytest.
    import pytest

    if subprocess.run(["openssl", "version"], capture_output=True).returncode != 0:
        pytest.fail("openssl is not installed (scripts/setup.sh installs it)", pytrace=False)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(certs: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
            "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=certs)


def make_cert(certs: Path, name: str, ca: str, *, ip: str | None = None, serial: int = 1) -> None:
    """`name`.crt and `name`.key signed by `ca`: a server certificate (for SERVER_NAME and `ip`) when `ip`
    is given, else a client certificate."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=certs)
    ext = certs / f"{name}.ext"
    lines = ["basicConstraints=CA:FALSE"]
    if ip:
        lines += [f"subjectAltName=DNS:{SERVER_NAME},IP:{ip}", "extendedKeyUsage=serverAuth"]
    else:
        lines.append("extendedKeyUsage=clientAuth")
    ext.write_text("\n".join(lines) + "\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-set_serial",
            str(serial), "-days", "2", "-extfile", ext.name, "-out", f"{name}.crt", cwd=certs)
