"""The server name (SNI) of a TLS ClientHello seen on a TCP connection.

The first bytes a TLS client sends are its ClientHello, in the clear.  Its
``server_name`` extension (RFC 6066) names the service the client wants, so a
flow to a shared CDN address can still be reported as "api.vendor.example".
Nothing is decrypted: this only reads what the client chose to send unencrypted
to every on-path network element.

Use :func:`client_hello_sni` on the client's first TCP payload bytes (the
segments concatenated in sequence order).  A ClientHello may span several TLS
records and several TCP segments -- hellos with post-quantum key shares are
about 1.8 KB -- so when the bytes so far are a valid but unfinished prefix the
answer is :class:`Incomplete`, telling how many bytes in total to collect
before asking again.  Anything that is not a well-formed ClientHello carrying a
valid host name gives ``None``; no input raises.

Cheap prefilter (vectorizable over many payloads): a candidate starts with
``0x16`` (handshake record), ``0x03`` (record version major) and has
``0x01`` (ClientHello) at byte 5.  See :data:`PREFILTER` and
:func:`looks_like_client_hello`.

Encrypted Client Hello (ECH, extension ``0xfe0d``): the real name is then in the
encrypted inner hello; the SNI read here is the outer, public name (typically
the provider's front, e.g. ``cloudflare-ech.com``).  It is still returned, since
it is what the network can know.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

__all__ = [
    "MAX_HANDSHAKE_BYTES",
    "MAX_HELLO_BYTES",
    "PREFILTER",
    "Incomplete",
    "client_hello_sni",
    "hello_sni",
    "looks_like_client_hello",
    "normalize_hostname",
]


class Incomplete(NamedTuple):
    """A valid prefix: retry once ``needed`` bytes in total have arrived.

    ``needed`` is a lower bound; the retry may answer with a larger one (for
    example when the next TLS record header reveals more to come).
    """

    needed: int


CONTENT_HANDSHAKE: Final = 22
HANDSHAKE_CLIENT_HELLO: Final = 1
EXT_SERVER_NAME: Final = 0
EXT_ECH: Final = 0xFE0D
NAME_TYPE_HOST: Final = 0

RECORD_HEADER: Final = 5
MAX_RECORD_PAYLOAD: Final = 16384
#: The largest ClientHello handshake message (4-byte header included) accepted.
MAX_HANDSHAKE_BYTES: Final = 16384
#: Most stream bytes ever asked for: the handshake message plus room for the
#: headers of up to 16 TLS records it may be split into.
MAX_HELLO_BYTES: Final = MAX_HANDSHAKE_BYTES + 16 * RECORD_HEADER

#: (offset, byte) pairs every candidate TCP payload has.
PREFILTER: Final[tuple[tuple[int, int], ...]] = ((0, 0x16), (1, 0x03), (5, 0x01))

_LABEL = re.compile(r"[a-z0-9_-]{1,63}")


def looks_like_client_hello(payload: bytes) -> bool:
    """The cheap prefilter: a handshake record whose first message is a ClientHello."""
    return len(payload) > 5 and all(payload[i] == b for i, b in PREFILTER)


def normalize_hostname(raw: bytes) -> str | None:
    """``raw`` as a lower-case DNS host name without the root dot, or None if not one."""
    if not raw.isascii():
        return None
    name = raw.decode("ascii").lower()
    if name.endswith("."):
        name = name[:-1]
    if not 0 < len(name) <= 253:
        return None
    if not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return None
    return name


class _Reader:
    """Bounds-checked big-endian reads; a short read gives None."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes | None:
        if n < 0 or self.left() < n:
            return None
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, width: int) -> int | None:
        raw = self.take(width)
        return None if raw is None else int.from_bytes(raw, "big")

    def vector(self, width: int) -> bytes | None:
        """A length-prefixed vector with a ``width``-byte length."""
        n = self.uint(width)
        return None if n is None else self.take(n)


def _server_name(body: bytes) -> str | None:
    """The host_name of a client's server_name extension body (RFC 6066 section 3)."""
    r = _Reader(body)
    names = r.vector(2)
    if names is None or r.left() != 0:
        return None
    entries = _Reader(names)
    while entries.left():
        name_type = entries.uint(1)
        name = entries.vector(2)
        if name_type is None or name is None:
            return None
        if name_type == NAME_TYPE_HOST:
            return normalize_hostname(name)
    return None


def hello_sni(handshake_message: bytes) -> str | None:
    """The SNI of one complete ClientHello handshake message, else None.

    ``handshake_message`` starts with the 4-byte handshake header (type 1 and a
    24-bit length) and must be exactly that long.  Shared by TLS over TCP and
    the CRYPTO stream of QUIC.
    """
    msg = bytes(handshake_message)
    if len(msg) < 4 or msg[0] != HANDSHAKE_CLIENT_HELLO:
        return None
    if int.from_bytes(msg[1:4], "big") != len(msg) - 4 or len(msg) > MAX_HANDSHAKE_BYTES:
        return None
    r = _Reader(msg[4:])
    version = r.take(2)
    if version is None or version[0] != 3 or r.take(32) is None:
        return None
    session_id = r.vector(1)
    suites = r.vector(2)
    compression = r.vector(1)
    if session_id is None or len(session_id) > 32:
        return None
    if suites is None or not suites or len(suites) % 2:
        return None
    if not compression:
        return None
    extensions = r.vector(2)
    if extensions is None or r.left() != 0:
        return None
    ext = _Reader(extensions)
    seen: set[int] = set()
    name: str | None = None
    while ext.left():
        ext_type = ext.uint(2)
        body = ext.vector(2)
        if ext_type is None or body is None or ext_type in seen:
            return None
        seen.add(ext_type)
        if ext_type == EXT_SERVER_NAME:
            name = _server_name(body)
    return name


def _record_header(stream: bytes, pos: int) -> int | None:
    """The payload length of the handshake record header at ``pos``.

    Returns -1 while the header is a valid but unfinished prefix, None when the
    bytes present already rule out a TLS handshake record.
    """
    head = stream[pos:pos + RECORD_HEADER]
    if len(head) >= 1 and head[0] != CONTENT_HANDSHAKE:
        return None
    if len(head) >= 2 and head[1] != 3:
        return None
    if len(head) >= 3 and head[2] > 4:
        return None
    if len(head) < RECORD_HEADER:
        return -1
    length = int.from_bytes(head[3:5], "big")
    if not 0 < length <= MAX_RECORD_PAYLOAD:
        return None
    return length


def client_hello_sni(stream: bytes) -> str | Incomplete | None:
    """The SNI of the ClientHello at the start of a client's TCP byte stream.

    Returns the normalized host name; ``None`` when the stream is not a
    ClientHello, carries no valid host name, or would need more than
    :data:`MAX_HELLO_BYTES`; or :class:`Incomplete` when more bytes are needed.
    """
    data = bytes(stream[:MAX_HELLO_BYTES])
    pos = 0
    message = bytearray()
    while True:
        length = _record_header(data, pos)
        if length is None:
            return None
        if length < 0:  # the next record header is still arriving
            if len(message) >= 4:
                wanted = 4 + int.from_bytes(message[1:4], "big")
                return _need(pos + RECORD_HEADER + wanted - len(message))
            return _need(pos + RECORD_HEADER)
        start = pos + RECORD_HEADER
        end = start + length
        fragment = data[start:end]
        # What the message header says, using whatever bytes have arrived.
        known = bytes(message) + fragment
        if known and known[0] != HANDSHAKE_CLIENT_HELLO:
            return None
        total: int | None = None
        if len(known) >= 4:
            total = 4 + int.from_bytes(known[1:4], "big")
            if total > MAX_HANDSHAKE_BYTES:
                return None
        if len(fragment) < length:  # this record is still arriving
            if total is None or total <= len(message) + length:
                return _need(end)
            return _need(end + RECORD_HEADER + total - len(message) - length)
        message += fragment
        pos = end
        if total is not None and len(message) >= total:
            return hello_sni(bytes(message[:total]))


def _need(total: int) -> Incomplete | None:
    return Incomplete(total) if total <= MAX_HELLO_BYTES else None
