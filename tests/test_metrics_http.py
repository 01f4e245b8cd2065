"""The /metrics server: plain HTTP, TLS, basic auth, mutual TLS and web config checks."""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import ipaddress
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import bcrypt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry, Counter

from egressd import metrics_http
from egressd.config import ConfigError, parse_config
from egressd.metrics_http import BasicAuth, MetricsServer, WebConfig, load_web_config, serve_metrics

PASSWORD = "s3cret-scrape"
# Cost 4 (the minimum) keeps the tests fast; real hashes use 10 or more.
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


def _self_signed(folder: Path, stem: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    server_cert, server_key = _self_signed(folder, "server")
    client_cert, client_key = _self_signed(folder, "client")
    _other_cert, other_key = _self_signed(folder, "other")
    return {
        "dir": folder,
        "cert": server_cert,
        "key": server_key,
        "client_cert": client_cert,
        "client_key": client_key,
        "other_key": other_key,
    }


@pytest.fixture
def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    Counter("egressd_test_things", "Things counted by the test", registry=reg).inc(3)
    return reg


@contextmanager
def running(registry: CollectorRegistry, web: WebConfig | None) -> Iterator[MetricsServer]:
    server = serve_metrics(registry, "127.0.0.1", 0, web)
    try:
        yield server
    finally:
        server.close()


def _url(server: MetricsServer, path: str = "/metrics", scheme: str | None = None) -> str:
    port = server.server_address[1]
    scheme = scheme or ("https" if server.ssl_context is not None else "http")
    return f"{scheme}://127.0.0.1:{port}{path}"


def fetch(
    url: str,
    *,
    context: ssl.SSLContext | None = None,
    user: str | None = None,
    password: str = "",
) -> tuple[int, http.client.HTTPMessage, bytes]:
    request = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def client_context(pki: dict[str, Path], *, with_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["cert"]))
    if with_cert:
        ctx.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    return ctx


def write_web_config(folder: Path, text: str, name: str = "web.yml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


# -- serving -----------------------------------------------------------------------------


def test_plain_http_serves_metrics_index_and_404(
    registry: CollectorRegistry, capfd: pytest.CaptureFixture[str]
) -> None:
    with running(registry, None) as server:
        assert server.url.startswith("http://127.0.0.1:")
        status, headers, body = fetch(_url(server))
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain")
        assert b"egressd_test_things_total 3.0" in body
        status, _, body = fetch(_url(server, "/"))
        assert status == 200 and b"/metrics" in body
        assert fetch(_url(server, "/nope"))[0] == 404
    # No access log on stderr, one line per request.
    assert capfd.readouterr().err == ""


def test_openmetrics_is_chosen_from_the_accept_header(registry: CollectorRegistry) -> None:
    with running(registry, None) as server:
        request = urllib.request.Request(
            _url(server), headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            assert response.read().endswith(b"# EOF\n")


def test_tls_serves_https_and_refuses_plain_http(
    registry: CollectorRegistry, pki: dict[str, Path], tmp_path: Path
) -> None:
    path = write_web_config(
        tmp_path,
        f"tls_server_config:\n  cert_file: {pki['cert']}\n  key_file: {pki['key']}\n",
    )
    web = load_web_config(path)
    with running(registry, web) as server:
        assert server.url.startswith("https://")
        status, _, body = fetch(_url(server), context=client_context(pki))
        assert status == 200 and b"egressd_test_things_total" in body
        with pytest.raises((OSError, http.client.HTTPException)):
            fetch(_url(server, scheme="http"))
        # The server still works after the failed attempt.
        assert fetch(_url(server), context=client_context(pki))[0] == 200


def test_min_version_is_enforced(
    registry: CollectorRegistry, pki: dict[str, Path], tmp_path: Path
) -> None:
    path = write_web_config(
        tmp_path,
        f"tls_server_config:\n  cert_file: {pki['cert']}\n  key_file: {pki['key']}\n"
        "  min_version: TLS13\n",
    )
    with running(registry, load_web_config(path)) as server:
        old = client_context(pki)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(OSError):
            fetch(_url(server), context=old)
        assert fetch(_url(server), context=client_context(pki))[0] == 200


def test_relative_paths_are_read_from_the_web_config_folder(pki: dict[str, Path]) -> None:
    path = write_web_config(
        pki["dir"], "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
    )
    web = load_web_config(path)
    assert web.tls is not None and web.tls.cert_file == str(pki["cert"])


def test_basic_auth_over_tls(
    registry: CollectorRegistry, pki: dict[str, Path], tmp_path: Path
) -> None:
    path = write_web_config(
        tmp_path,
        f"tls_server_config:\n  cert_file: {pki['cert']}\n  key_file: {pki['key']}\n"
        f"basic_auth_users:\n  prometheus: {HASH}\n",
    )
    ctx = client_context(pki)
    with running(registry, load_web_config(path)) as server:
        url = _url(server)
        status, headers, body = fetch(url, context=ctx)
        assert status == 401
        assert headers["WWW-Authenticate"] == 'Basic realm="egressd"'
        assert b"egressd_test" not in body
        assert fetch(url, context=ctx, user="prometheus", password="wrong")[0] == 401
        assert fetch(url, context=ctx, user="nobody", password=PASSWORD)[0] == 401
        assert fetch(url, context=ctx, user="prometheus", password="x" * 100)[0] == 401
        # The index and unknown paths need the password too.
        assert fetch(_url(server, "/"), context=ctx)[0] == 401
        status, _, body = fetch(url, context=ctx, user="prometheus", password=PASSWORD)
        assert status == 200 and b"egressd_test_things_total 3.0" in body
        assert fetch(_url(server, "/x"), context=ctx, user="prometheus", password=PASSWORD)[
            0
        ] == 404


def test_basic_auth_without_tls(registry: CollectorRegistry, tmp_path: Path) -> None:
    path = write_web_config(tmp_path, f"basic_auth_users:\n  prometheus: '{HASH}'\n")
    with running(registry, load_web_config(path)) as server:
        request = urllib.request.Request(_url(server), headers={"Authorization": "Bearer x"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=5)
        assert caught.value.code == 401
        assert fetch(_url(server), user="prometheus", password=PASSWORD)[0] == 200


def test_mutual_tls(registry: CollectorRegistry, pki: dict[str, Path], tmp_path: Path) -> None:
    path = write_web_config(
        tmp_path,
        f"tls_server_config:\n  cert_file: {pki['cert']}\n  key_file: {pki['key']}\n"
        f"  client_auth_type: RequireAndVerifyClientCert\n"
        f"  client_ca_file: {pki['client_cert']}\n",
    )
    with running(registry, load_web_config(path)) as server:
        assert fetch(_url(server), context=client_context(pki, with_cert=True))[0] == 200
        with pytest.raises((OSError, http.client.HTTPException)):
            fetch(_url(server), context=client_context(pki))


def test_successful_checks_are_cached_and_unknown_users_cost_a_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    auth = BasicAuth({"prometheus": HASH.encode()})
    calls: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(metrics_http.bcrypt, "checkpw", counting)
    assert auth.check("prometheus", PASSWORD)
    assert auth.check("prometheus", PASSWORD)
    assert len(calls) == 1
    assert not auth.check("prometheus", "wrong")
    assert not auth.check("prometheus", "wrong")
    assert len(calls) == 3  # failures are never cached
    assert not auth.check("nobody", PASSWORD)
    assert len(calls) == 4 and calls[-1] != HASH.encode()
    expired = BasicAuth({"prometheus": HASH.encode()}, ttl=0.0)
    calls.clear()
    assert expired.check("prometheus", PASSWORD) and expired.check("prometheus", PASSWORD)
    assert len(calls) == 2


def test_web_config_repr_hides_hashes(tmp_path: Path) -> None:
    web = load_web_config(write_web_config(tmp_path, f"basic_auth_users:\n  p: '{HASH}'\n"))
    assert HASH not in repr(web)
    assert web.users == {"p": HASH.encode()}


def test_empty_web_config_means_plain_http(tmp_path: Path) -> None:
    web = load_web_config(write_web_config(tmp_path, ""))
    assert web.tls is None and web.basic_auth_users == ()


# -- bad web config files --------------------------------------------------------------

BAD_CASES = [
    ("top level is a list", "- a\n", "the top level must be a mapping"),
    ("unknown top key", "http_server_config: {{}}\n", "http_server_config: unknown or unsupported"),
    ("malformed YAML", "tls_server_config: [\n", "invalid YAML"),
    ("tls not a mapping", "tls_server_config: yes\n", "tls_server_config: true: expected a"),
    ("missing key_file", "tls_server_config:\n  cert_file: {cert}\n",
     "tls_server_config.key_file: required key is missing"),
    ("unknown tls key", "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  cipher_suites: []\n", "tls_server_config.cipher_suites: unknown or unsupported"),
    ("cert file missing", "tls_server_config:\n  cert_file: /nonexistent/x.crt\n"
     "  key_file: {key}\n", "tls_server_config.cert_file: '/nonexistent/x.crt': cannot read"),
    ("cert file of wrong type", "tls_server_config:\n  cert_file: 12\n  key_file: {key}\n",
     "tls_server_config.cert_file: 12: expected a non-empty string"),
    ("key does not match cert", "tls_server_config:\n  cert_file: {cert}\n"
     "  key_file: {other_key}\n", "tls_server_config.cert_file"),
    ("cert is not a certificate", "tls_server_config:\n  cert_file: {web}\n  key_file: {key}\n",
     "cannot load cert_file with key_file"),
    ("bad min_version", "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  min_version: TLS10\n", "tls_server_config.min_version: 'TLS10': expected one of"),
    ("client ca without auth type", "tls_server_config:\n  cert_file: {cert}\n"
     "  key_file: {key}\n  client_ca_file: {cert}\n", "go together"),
    ("users not a mapping", "basic_auth_users: [a, b]\n", "basic_auth_users: expected a mapping"),
    ("hash is not bcrypt", "basic_auth_users:\n  prometheus: secret\n",
     "basic_auth_users.prometheus: is not a bcrypt hash"),
    ("hash is a number", "basic_auth_users:\n  prometheus: 12\n",
     "basic_auth_users.prometheus: expected a bcrypt hash"),
    ("user name with colon", "basic_auth_users:\n  'a:b': '{hash}'\n",
     "'a:b' is not a valid user name"),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES]
)
def test_bad_web_config_is_refused_clearly(
    text: str, expected: str, pki: dict[str, Path], tmp_path: Path
) -> None:
    web = tmp_path / "web.yml"
    text = text.format(
        cert=pki["cert"], key=pki["key"], other_key=pki["other_key"], web=web, hash=HASH
    )
    web.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_web_config(web)
    message = str(caught.value)
    assert message.startswith(str(web)), message
    assert expected in message, message
    assert "\n" not in message
    assert "secret" not in message or "not a bcrypt" in message


def test_unreadable_web_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the web config file"):
        load_web_config(tmp_path / "missing.yml")


# -- metrics.web_config in the main configuration ------------------------------------------


def _config(listen: str, web: Path | None) -> bytes:
    lines = ["home_countries: [CN]", "metrics:", f"  listen: '{listen}'"]
    if web is not None:
        lines.append(f"  web_config: '{web}'")
    return ("\n".join(lines) + "\n").encode()


def test_config_web_config_is_parsed_and_loaded(pki: dict[str, Path], tmp_path: Path) -> None:
    web = write_web_config(
        tmp_path,
        f"tls_server_config:\n  cert_file: {pki['cert']}\n  key_file: {pki['key']}\n"
        f"basic_auth_users:\n  prometheus: '{HASH}'\n",
    )
    config = parse_config(_config("0.0.0.0:9855", web), "egressd.yaml")
    assert config.metrics.web_config == str(web)
    loaded = config.metrics.load_web_config()
    assert loaded is not None and loaded.tls is not None and "prometheus" in loaded.users
    assert config.policy.warnings == []
    default = parse_config(b"home_countries: [CN]\n", "egressd.yaml")
    assert default.metrics.web_config is None and default.metrics.load_web_config() is None


def test_config_with_a_bad_web_config_fails(tmp_path: Path) -> None:
    web = write_web_config(tmp_path, "basic_auth_users:\n  prometheus: nope\n")
    with pytest.raises(ConfigError) as caught:
        parse_config(_config("127.0.0.1:9855", web), "egressd.yaml")
    message = str(caught.value)
    assert message.startswith("egressd.yaml:4: metrics.web_config: "), message
    assert f"{web}: basic_auth_users.prometheus: is not a bcrypt hash" in message
    with pytest.raises(ConfigError, match=r"egressd.yaml:4: metrics.web_config: .*cannot read"):
        parse_config(_config("127.0.0.1:9855", tmp_path / "missing.yml"), "egressd.yaml")
    with pytest.raises(ConfigError, match=r"egressd.yaml:4: metrics.web_config: 5: expected"):
        parse_config(b"home_countries: [CN]\nmetrics:\n  listen: '127.0.0.1:1'\n"
                     b"  web_config: 5\n", "egressd.yaml")


@pytest.mark.parametrize(
    ("listen", "warned"),
    [("127.0.0.1:9855", False), ("[::1]:9855", False), ("localhost:9855", False),
     ("0.0.0.0:9855", True), ("[::]:9855", True), ("10.0.0.1:9855", True)],
)
def test_open_metrics_endpoint_is_warned_about(listen: str, warned: bool) -> None:
    config = parse_config(_config(listen, None), "egressd.yaml")
    found = [w for w in config.policy.warnings if "metrics.listen" in w]
    assert bool(found) == warned, config.policy.warnings
    if warned:
        assert found[0].startswith("egressd.yaml:3: metrics.listen: ")


def test_basic_auth_without_tls_is_warned_about(tmp_path: Path) -> None:
    web = write_web_config(tmp_path, f"basic_auth_users:\n  prometheus: '{HASH}'\n")
    config = parse_config(_config("0.0.0.0:9855", web), "egressd.yaml")
    assert any("clear text" in w for w in config.policy.warnings)
