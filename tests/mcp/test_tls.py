"""The bridge reaches a service that serves only TLS, with mutual TLS on: it verifies
the service's certificate against a CA it is given, presents its own client
certificate, and a bridge without one (or with one from another CA) gets the
service-unavailable result, not a crash. Certificates are made here."""

from __future__ import annotations

import datetime
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from bridge_support import describe, failed, lifecycle
from conftest import (
    BRIDGE_BIN,
    SERVICE_BIN,
    Process,
    RestartableService,
    Service,
    http_client,
    launch_http_bridge,
    stdio_client,
    unique_name,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

pytestmark = pytest.mark.anyio


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> str:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(path)


class Ca:
    def __init__(self, cn: str):
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(cn))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def write(self, path: Path) -> str:
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return str(path)

    def leaf(self, directory: Path, stem: str, dns_names: list[str], usage) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(stem))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if dns_names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path = directory / f"{stem}.crt"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(cert_path), _write_key(directory / f"{stem}.key", key)


@dataclass
class Pki:
    ca: str
    client_cert: str
    client_key: str
    stranger_cert: str
    stranger_key: str


class MutualTlsService(RestartableService):
    """`db-lifecycle serve` over the dev cluster with `[tls]` and a client CA: TLS
    only, and only for clients with a certificate from that CA."""

    def __init__(self, dev: Service, log_dir: Path, directory: Path):
        super().__init__(dev, log_dir)
        ca, client_ca, other_ca = Ca("service CA"), Ca("client CA"), Ca("other CA")
        # Valid for `localhost` only, so connecting by IP needs --service-tls-name.
        server_cert, server_key = ca.leaf(directory, "server", ["localhost"], ExtendedKeyUsageOID.SERVER_AUTH)
        client_cert, client_key = client_ca.leaf(directory, "bridge", [], ExtendedKeyUsageOID.CLIENT_AUTH)
        stranger_cert, stranger_key = other_ca.leaf(directory, "stranger", [], ExtendedKeyUsageOID.CLIENT_AUTH)
        self.pki = Pki(
            ca=ca.write(directory / "ca.pem"),
            client_cert=client_cert,
            client_key=client_key,
            stranger_cert=stranger_cert,
            stranger_key=stranger_key,
        )
        tls = (
            "[tls]\n"
            f'cert_file = "{server_cert}"\n'
            f'key_file = "{server_key}"\n'
            f'client_ca_file = "{client_ca.write(directory / "client-ca.pem")}"\n'
        )
        # A table of its own: after the top-level keys, before the [[principals]].
        head, sep, principals = self.config.read_text().partition("\n[[principals]]")
        self.config.write_text(f"{head}\n{tls}{sep}{principals}")

    def start(self) -> None:
        self.starts += 1
        self.process = Process(
            f"db-lifecycle-serve-tls-{self.port}-{self.starts}",
            [str(SERVICE_BIN), "serve", "--config", str(self.config)],
            self.log_dir,
        )
        # Health over plaintext would be refused; the bridge calls show it serving.
        self.process.wait_for_stdout("db-lifecycle listening on")

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def bridge_args(self, *, client: str | None = "bridge") -> list[str]:
        args = ["--service-ca-file", self.pki.ca]
        if client == "bridge":
            args += ["--client-cert-file", self.pki.client_cert, "--client-key-file", self.pki.client_key]
        elif client == "stranger":
            args += ["--client-cert-file", self.pki.stranger_cert, "--client-key-file", self.pki.stranger_key]
        return args


@pytest.fixture
def tls_service(service: Service, log_dir: Path, tmp_path: Path):
    svc = MutualTlsService(service, log_dir, tmp_path)
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


async def test_stdio_bridge_with_a_client_certificate_reaches_a_mutual_tls_service(
    tls_service: MutualTlsService, service: Service
) -> None:
    name = unique_name("tls")
    token = service.tokens["requester"]
    async with stdio_client(tls_service.url, token, *tls_service.bridge_args()) as client:
        answer = await describe(client, name)
        assert answer["exists"] is False and answer["correlation_id"]

    # By IP the certificate's name does not match, unless the bridge is told the name.
    by_ip = f"https://127.0.0.1:{tls_service.port}"
    async with stdio_client(by_ip, token, *tls_service.bridge_args()) as client:
        failed(await lifecycle(client, action="describe", environment="dev", database_name=name), "UNAVAILABLE")
    async with stdio_client(by_ip, token, *tls_service.bridge_args(), "--service-tls-name", "localhost") as client:
        assert (await describe(client, name))["exists"] is False


async def test_http_bridge_with_a_client_certificate_reaches_a_mutual_tls_service(
    tls_service: MutualTlsService, service: Service, log_dir: Path
) -> None:
    bridge = launch_http_bridge(log_dir, tls_service.url, *tls_service.bridge_args())
    try:
        async with http_client(bridge.url, service.tokens["requester"]) as client:
            assert (await describe(client, unique_name("tls")))["owned_by_project"] is False
    finally:
        bridge.process.stop()


async def test_an_http_url_for_a_tls_service_is_unavailable_with_a_hint(
    tls_service: MutualTlsService, service: Service
) -> None:
    plain = f"http://localhost:{tls_service.port}"
    async with stdio_client(plain, service.tokens["requester"]) as client:
        body = failed(
            await lifecycle(client, action="describe", environment="dev", database_name=unique_name("tls")),
            "UNAVAILABLE",
        )
        assert "https://" in body["message"], body


@pytest.mark.parametrize("client", [None, "stranger"])
async def test_without_a_valid_client_certificate_the_agent_gets_unavailable(
    tls_service: MutualTlsService, service: Service, client: str | None
) -> None:
    token = service.tokens["requester"]
    async with stdio_client(tls_service.url, token, *tls_service.bridge_args(client=client)) as mcp:
        body = failed(
            await lifecycle(mcp, action="describe", environment="dev", database_name=unique_name("tls")),
            "UNAVAILABLE",
        )
        assert token not in str(body)
        assert "--service-ca-file" in body["message"] and "Status {" not in body["message"], body
        # The bridge is still there for the next call.
        failed(
            await lifecycle(mcp, action="describe", environment="dev", database_name=unique_name("tls")),
            "UNAVAILABLE",
        )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--service-url", "https://localhost:1", "--service-ca-file", "/nonexistent/ca.pem"], "--service-ca-file"),
        (["--service-url", "http://localhost:1", "--service-ca-file", "/etc/hostname"], "https://"),
        (
            ["--service-url", "https://localhost:1", "--client-cert-file", "/etc/hostname"],
            "--client-key-file",
        ),
        (["--service-url", "ftp://localhost:1"], "scheme"),
    ],
)
def test_unusable_tls_options_stop_the_bridge_at_start_naming_the_option(args: list[str], needle: str) -> None:
    done = subprocess.run(
        [str(BRIDGE_BIN), "--transport", "http", "--listen", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0, done
    assert needle in done.stderr, done.stderr
