"""The HTTP(S) server of the Prometheus ``/metrics`` endpoint.

Without a web config it serves plain HTTP, as the default loopback address
needs nothing more.  A web config file in the format Prometheus exporters use
adds TLS and/or HTTP basic auth::

    tls_server_config:
      cert_file: metrics.crt        # relative paths: from the web config's folder
      key_file: metrics.key
    basic_auth_users:
      prometheus: $2y$10$...        # bcrypt hash of the password

Supported keys: ``tls_server_config`` (``cert_file``, ``key_file``,
``min_version`` ``TLS12``/``TLS13``, ``client_auth_type``
``NoClientCert``/``RequireAndVerifyClientCert``, ``client_ca_file``) and
``basic_auth_users``.  Anything else is refused rather than silently ignored.

Security notes:

* TLS handshakes run in the per-connection thread, with a socket timeout, so
  a client that connects and stays silent cannot stall the accept loop.
* Passwords are checked with bcrypt; an unknown user costs one bcrypt check
  too, so response time does not tell which user names exist.  A successful
  (user, password) pair is remembered (as a keyed digest, never in clear) for
  :data:`AUTH_CACHE_SECONDS` so that every scrape does not cost a bcrypt run.
  At most :data:`MAX_CONCURRENT_BCRYPT` checks run at once, which bounds the
  CPU a flood of wrong passwords can take.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import urlsplit

import bcrypt
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from egressd.config import ConfigError
from egressd.config.yaml_doc import read_limited

log = logging.getLogger("egressd")

MAX_WEB_CONFIG_BYTES: Final = 1024 * 1024
"""Larger web config files are refused unread."""
AUTH_CACHE_SECONDS: Final = 60.0
"""How long a successful basic-auth check is remembered."""
AUTH_CACHE_ENTRIES: Final = 256
"""At most this many remembered checks (the cache is emptied when full)."""
MAX_CONCURRENT_BCRYPT: Final = 4
"""bcrypt checks allowed to run at the same time; further requests wait."""
SOCKET_TIMEOUT_SECONDS: Final = 30.0
"""Idle time after which a client connection (or a TLS handshake) is dropped."""
REALM: Final = "egressd"

_TLS_VERSIONS: Final = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_CLIENT_AUTH_TYPES: Final = ("NoClientCert", "RequireAndVerifyClientCert")
_TOP_KEYS: Final = ("tls_server_config", "basic_auth_users")
_TLS_KEYS: Final = ("cert_file", "key_file", "min_version", "client_auth_type", "client_ca_file")
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")


@dataclass(frozen=True, slots=True)
class TLSServerConfig:
    """``tls_server_config``: paths are absolute (resolved against the web config's folder)."""

    cert_file: str
    key_file: str
    min_version: str = "TLS12"
    client_auth_type: str = "NoClientCert"
    client_ca_file: str | None = None

    def context(self) -> ssl.SSLContext:
        """A server-side SSL context; raises :class:`ssl.SSLError` or :class:`OSError`."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = _TLS_VERSIONS[self.min_version]
        # An encrypted key would make OpenSSL prompt on the terminal: refuse it instead.
        ctx.load_cert_chain(self.cert_file, self.key_file, password=_no_password)
        if self.client_auth_type == "RequireAndVerifyClientCert":
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=self.client_ca_file)
        return ctx


def _no_password() -> bytes:
    raise ValueError("encrypted private keys are not supported")


@dataclass(frozen=True, slots=True)
class WebConfig:
    """A checked web config file: TLS settings and basic-auth users (both optional)."""

    path: str
    tls: TLSServerConfig | None = None
    basic_auth_users: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    """(user, bcrypt hash) pairs; kept out of ``repr`` so that logs never show hashes."""

    @property
    def users(self) -> dict[str, bytes]:
        return {user: hashed.encode("ascii") for user, hashed in self.basic_auth_users}


# ---------------------------------------------------------------------------
# Loading and checking the web config file
# ---------------------------------------------------------------------------


def load_web_config(path: str | os.PathLike[str]) -> WebConfig:
    """Read and check a web config file; raises :class:`ConfigError` naming file and key.

    The certificate and key are loaded once here, so that a file that would
    fail at start-up is reported by ``egressd check-config``.
    """
    name = os.fspath(path)
    data = read_limited(name, MAX_WEB_CONFIG_BYTES, "web config file")
    try:
        raw = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(name, None, "", "not UTF-8 text") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(name, line, "", f"invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(name, None, "", f"invalid YAML: {exc}") from None
    if raw is None:
        return WebConfig(path=name)
    if not isinstance(raw, dict):
        raise ConfigError(name, 1, "", "the top level must be a mapping of "
                          + " and ".join(_TOP_KEYS))
    _known_keys(name, "", raw, _TOP_KEYS)
    base = os.path.dirname(os.path.abspath(name))
    tls = _tls(name, base, raw.get("tls_server_config"))
    users = _users(name, raw.get("basic_auth_users"))
    return WebConfig(path=name, tls=tls, basic_auth_users=users)


def _known_keys(name: str, where: str, mapping: Mapping[Any, Any], keys: tuple[str, ...]) -> None:
    for key in mapping:
        if key not in keys:
            path = f"{where}.{key}" if where else str(key)
            raise ConfigError(name, None, path,
                              f"unknown or unsupported key (expected one of: {', '.join(keys)})")


def _string(name: str, key: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(name, None, key, "expected a non-empty string", value)
    return value


def _file(name: str, base: str, key: str, value: object) -> str:
    path = os.path.join(base, _string(name, key, value))
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise ConfigError(name, None, key, f"cannot read the file: {reason}", value) from None
    return path


def _tls(name: str, base: str, raw: object) -> TLSServerConfig | None:
    where = "tls_server_config"
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(name, None, where, "expected a mapping with cert_file and key_file", raw)
    _known_keys(name, where, raw, _TLS_KEYS)
    for key in ("cert_file", "key_file"):
        if key not in raw:
            raise ConfigError(name, None, f"{where}.{key}", "required key is missing")
    cert = _file(name, base, f"{where}.cert_file", raw["cert_file"])
    key_file = _file(name, base, f"{where}.key_file", raw["key_file"])
    version = raw.get("min_version", "TLS12")
    if version not in _TLS_VERSIONS:
        raise ConfigError(name, None, f"{where}.min_version",
                          f"expected one of {', '.join(_TLS_VERSIONS)}", version)
    auth = raw.get("client_auth_type", "NoClientCert")
    if auth not in _CLIENT_AUTH_TYPES:
        raise ConfigError(name, None, f"{where}.client_auth_type",
                          f"expected one of {', '.join(_CLIENT_AUTH_TYPES)}", auth)
    ca: str | None = None
    if raw.get("client_ca_file") is not None:
        ca = _file(name, base, f"{where}.client_ca_file", raw["client_ca_file"])
    if (ca is None) != (auth == "NoClientCert"):
        raise ConfigError(name, None, where, "client_ca_file and client_auth_type: "
                          "RequireAndVerifyClientCert go together (one is set without the other)")
    tls = TLSServerConfig(cert_file=cert, key_file=key_file, min_version=version,
                          client_auth_type=auth, client_ca_file=ca)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key_file, password=_no_password)
    except (OSError, ValueError) as exc:
        raise ConfigError(name, None, f"{where}.cert_file",
                          f"cannot load cert_file with key_file: {_reason(exc)}",
                          raw["cert_file"]) from None
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ValueError) as exc:
            raise ConfigError(name, None, f"{where}.client_ca_file",
                              f"cannot load the CA certificates: {_reason(exc)}",
                              raw["client_ca_file"]) from None
    return tls


def _reason(exc: Exception) -> str:
    text = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", text) or exc.__class__.__name__


def _users(name: str, raw: object) -> tuple[tuple[str, str], ...]:
    where = "basic_auth_users"
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ConfigError(name, None, where, "expected a mapping of user name: bcrypt hash")
    users: list[tuple[str, str]] = []
    for user, hashed in raw.items():
        if not isinstance(user, str) or not user or ":" in user or not user.isprintable():
            raise ConfigError(name, None, where, "is not a valid user name (quote it if YAML "
                              "reads it as a number; no ':' allowed)", user)
        key = f"{where}.{user}" if re.fullmatch(r"[A-Za-z0-9_-]+", user) else f"{where}[{user!r}]"
        # The hash itself is never shown in messages.
        if not isinstance(hashed, str):
            raise ConfigError(name, None, key, "expected a bcrypt hash ($2y$..., $2b$...) string")
        match = _BCRYPT_HASH.fullmatch(hashed.strip())
        if match is None:
            raise ConfigError(name, None, key, "is not a bcrypt hash (expected $2y$, $2b$ or "
                              "$2a$, a two-digit cost, and 53 characters of salt and hash)")
        if not 4 <= int(match[1]) <= 31:
            raise ConfigError(name, None, key, "bcrypt cost must be 4-31", int(match[1]))
        users.append((user, hashed.strip()))
    return tuple(users)


# ---------------------------------------------------------------------------
# Basic auth
# ---------------------------------------------------------------------------


class BasicAuth:
    """Checks basic-auth credentials against bcrypt hashes, with a short in-memory cache."""

    def __init__(self, users: Mapping[str, bytes], *, ttl: float = AUTH_CACHE_SECONDS) -> None:
        self._users = dict(users)
        self._ttl = ttl
        costs = [int(h[4:6]) for h in self._users.values()] or [10]
        # Checked instead when the user is unknown: same cost, never matches.
        self._dummy = bcrypt.hashpw(secrets.token_hex(16).encode(), bcrypt.gensalt(max(costs)))
        self._key = secrets.token_bytes(32)
        self._cache: dict[bytes, float] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT_BCRYPT)

    @property
    def enabled(self) -> bool:
        return bool(self._users)

    def _digest(self, user: str, hashed: bytes, password: bytes) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (user.encode("utf-8"), hashed, password):
            mac.update(len(part).to_bytes(8, "big"))
            mac.update(part)
        return mac.digest()

    def check(self, user: str, password: str) -> bool:
        hashed = self._users.get(user)
        secret = password.encode("utf-8", "surrogateescape")
        now = time.monotonic()
        digest = self._digest(user, hashed or b"", secret) if hashed is not None else b""
        if hashed is not None:
            with self._lock:
                expires = self._cache.get(digest)
            if expires is not None and expires > now:
                return True
        ok = self._bcrypt(secret, hashed if hashed is not None else self._dummy)
        if not ok or hashed is None:
            return False
        with self._lock:
            if len(self._cache) >= AUTH_CACHE_ENTRIES:
                self._cache = {d: t for d, t in self._cache.items() if t > now}
                if len(self._cache) >= AUTH_CACHE_ENTRIES:
                    self._cache.clear()
            self._cache[digest] = now + self._ttl
        return True

    def _bcrypt(self, password: bytes, hashed: bytes) -> bool:
        too_long = len(password) > 72
        with self._slots:
            try:
                # Over-long passwords are refused, after the same amount of work.
                return bcrypt.checkpw(password[:72], hashed) and not too_long
            except ValueError:
                return False


def _credentials(header: str | None) -> tuple[str, str] | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        text = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, sep, password = text.partition(":")
    return (user, password) if sep else None


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------

_INDEX: Final = b"egressd: network egress monitor\nMetrics: /metrics\n"


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    protocol_version = "HTTP/1.1"
    server_version = "egressd"
    sys_version = ""
    timeout = SOCKET_TIMEOUT_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        """No per-request logging."""

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, *, body: bool) -> None:
        auth = self.server.auth
        if auth.enabled:
            creds = _credentials(self.headers.get("Authorization"))
            if creds is None or not auth.check(*creds):
                self._reply(401, b"Unauthorized\n", "text/plain; charset=utf-8", body=body,
                            extra={"WWW-Authenticate": f'Basic realm="{REALM}"'})
                return
        path = urlsplit(self.path).path
        if path == "/metrics":
            try:
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                output = encoder(self.server.registry)
            except Exception:
                log.exception("cannot produce the metrics")
                self._reply(500, b"Internal Server Error\n", "text/plain; charset=utf-8",
                            body=body)
                return
            extra: dict[str, str] = {}
            if "gzip" in self.headers.get("Accept-Encoding", ""):
                output = gzip.compress(output)
                extra["Content-Encoding"] = "gzip"
            self._reply(200, output, content_type, body=body, extra=extra)
        elif path == "/":
            self._reply(200, _INDEX, "text/plain; charset=utf-8", body=body)
        else:
            self._reply(404, b"Not Found\n", "text/plain; charset=utf-8", body=body)

    def _reply(self, status: int, payload: bytes, content_type: str, *, body: bool,
               extra: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        if status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if body:
            self.wfile.write(payload)


class MetricsServer(ThreadingHTTPServer):
    """Serves ``/metrics`` of ``registry``; :meth:`close` stops it."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily,
                 registry: CollectorRegistry, web_config: WebConfig | None) -> None:
        self.address_family = family
        self.registry = registry
        self.web_config = web_config
        tls = web_config.tls if web_config is not None else None
        self.ssl_context = tls.context() if tls is not None else None
        self.auth = BasicAuth(web_config.users if web_config is not None else {})
        self.thread: threading.Thread | None = None
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = str(host)
        shown = f"[{host}]" if ":" in host else host
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{shown}:{port}/metrics"

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(SOCKET_TIMEOUT_SECONDS)
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        try:
            # Handshake here, in the connection's own thread, not in accept().
            conn = self.ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ValueError):
            return  # plain HTTP to the TLS port, a bad client certificate, a timeout
        try:
            _Handler(conn, client_address, self)
        finally:
            conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics request from %s failed", client_address, exc_info=True)

    def close(self) -> None:
        """Stop serving and release the port."""
        self.shutdown()
        self.server_close()
        if self.thread is not None:
            self.thread.join(timeout=5)


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_metrics(registry: CollectorRegistry, host: str, port: int,
                  web_config: WebConfig | None) -> MetricsServer:
    """Start serving ``registry`` on ``host:port`` from a daemon thread; returns the server.

    ``port`` 0 picks a free port (see ``server.server_address``).  Raises
    :class:`OSError` when the address cannot be bound and :class:`ssl.SSLError`
    when the certificate or key cannot be loaded.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    server = MetricsServer((str(sockaddr[0]), int(sockaddr[1])), family, registry, web_config)
    if not _is_loopback(host):
        if web_config is None or web_config.tls is None:
            log.warning("metrics are served without TLS on the non-loopback address %s; "
                        "set metrics.web_config to add TLS and basic auth", host)
        if not server.auth.enabled:
            log.warning("metrics on %s need no password: anyone who reaches the port can "
                        "read them (set basic_auth_users in metrics.web_config)", host)
    thread = threading.Thread(target=server.serve_forever, name="egressd-metrics", daemon=True)
    server.thread = thread
    thread.start()
    return server


__all__ = [
    "AUTH_CACHE_SECONDS",
    "BasicAuth",
    "MetricsServer",
    "TLSServerConfig",
    "WebConfig",
    "load_web_config",
    "serve_metrics",
]
