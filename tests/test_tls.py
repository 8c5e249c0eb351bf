"""HTTPS on the gateway: Frontend.tls_cert and Frontend.tls_key, with a self-signed
certificate made for the test."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.http_support import SEED_OUTPUT, SEED_TEXT, http
from tests.support import Stack, free_port, run_zroute, wait_until


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its private key: their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .sign(key, hashes.SHA256()))
    cert, key_file = directory / "gateway.crt", directory / "gateway.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return cert, key_file


def https(url: str, cert: Path, body: bytes | None = None) -> tuple[int, bytes] | None:
    """A request that trusts `cert` only; None if no TLS server answers."""
    context = ssl.create_default_context(cafile=str(cert))
    request = urllib.request.Request(url, data=body, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return None


def healthy(url: str, cert: Path) -> bool:
    reply = https(f"{url}/health", cert)
    return reply is not None and json.loads(reply[1]).get("status") == "ok"


@pytest.mark.timeout(60)
def test_the_gateway_serves_https_with_a_certificate(stack: Stack, tmp_path):
    cert, key = self_signed(tmp_path)
    stack.broker()
    stack.worker("w1")
    port, admin_port = free_port(), free_port()
    gateway = stack.start("gateway", "gateway", "--broker", stack.frontend, "--port", str(port),
                          f"--Frontend.admin_port={admin_port}",
                          f"--Frontend.tls_cert={cert}", f"--Frontend.tls_key={key}")
    url, admin = f"https://127.0.0.1:{port}", f"https://127.0.0.1:{admin_port}"
    wait_until(lambda: healthy(url, cert), 15, "the gateway to answer over HTTPS")
    assert (f"gateway listening on {url}, operators' endpoints on {admin}"
            in gateway.output())
    status, stats = https(f"{admin}/stats", cert)  # the operators' listener too
    assert status == 200 and "broker" in json.loads(stats)
    assert https(f"{url}/generate", cert, json.dumps({"text": SEED_TEXT}).encode()) == \
        (200, SEED_OUTPUT.encode())
    for plain in (port, admin_port):  # no plaintext HTTP there
        assert http("GET", f"http://127.0.0.1:{plain}/health") is None


@pytest.mark.timeout(60)
def test_serve_checks_its_https_gateways_health(stack: Stack, tmp_path):
    cert, key = self_signed(tmp_path)
    port = free_port()
    serve = stack.start("serve", "serve", "--port", str(port), "--Backend.sleep_time=0",
                        f"--Broker.frontend={stack.frontend}", f"--Broker.backend={stack.backend}",
                        f"--Frontend.tls_cert={cert}", f"--Frontend.tls_key={key}")
    url = f"https://127.0.0.1:{port}"
    wait_until(lambda: f"zroute is serving on {url}" in serve.output(), 30, "serve to be ready")
    assert https(f"{url}/generate", cert, b'{"text": "a"}') == (200, b"Hello a!\n")


@pytest.mark.timeout(30)
def test_tls_settings_that_cannot_be_used_are_one_line(tmp_path):
    cert, key = self_signed(tmp_path)
    args = ("gateway", "--port", str(free_port()), "--broker", f"tcp://127.0.0.1:{free_port()}")
    for settings, message in (
            ((f"--Frontend.tls_cert={cert}",),
             "Frontend.tls_cert is set but not Frontend.tls_key: HTTPS needs both the "
             "certificate and its private key"),
            ((f"--Frontend.tls_cert={key}", f"--Frontend.tls_key={cert}"),
             f"Frontend.tls_cert '{key}' and Frontend.tls_key '{cert}' cannot be used: ")):
        result = run_zroute(*args, *settings)
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith(f"zroute gateway: error: {message}"), line
