"""The server name (SNI) of a QUIC client's ClientHello, read from its Initial packets.

QUIC (RFC 9000) carries the TLS ClientHello in CRYPTO frames of Initial
packets.  These are encrypted, but with keys every observer can compute: RFC
9001 section 5.2 derives them from a fixed, published salt and the Destination
Connection ID the client put in the clear in the packet header.  This
protection only guards against tampering by off-path attackers -- it is not
confidentiality (RFC 9001 section 7 says so: Initial packets "do not have
confidentiality protection"), and decrypting it reveals nothing beyond what a
plain TLS ClientHello shows on TCP.  Handshake and 1-RTT packets use keys from the
key exchange; those are never touched here.

Use one :class:`QuicHelloAssembler` per client flow and :meth:`feed
<QuicHelloAssembler.feed>` it the UDP payloads the client sends.  Browsers
split the ClientHello over several CRYPTO frames, out of order, and -- with
post-quantum key shares -- over two Initial datagrams; the assembler collects
CRYPTO data by offset until the whole ClientHello is there.
:func:`quic_initial_sni` is the one-datagram shortcut.  No input raises;
anything that does not decrypt as a client Initial (a server's Initial, a
corrupted packet, other traffic) gives ``None``.

Versions: QUIC v1 (``0x00000001``) and v2 (``0x6b3343cf``, RFC 9369).

Cheap prefilter (vectorizable over UDP payloads): ``b[0] & 0xC0 == 0xC0``
(long header, fixed bit), ``b[1:5]`` a supported version, and the long packet
type Initial: ``b[0] & 0x30 == 0x00`` for v1, ``0x10`` for v2.  See
:func:`looks_like_initial`.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final, NamedTuple

from egressd.names.tls import MAX_HANDSHAKE_BYTES, Incomplete, hello_sni

__all__ = [
    "VERSION_1",
    "VERSION_2",
    "Incomplete",
    "InitialKeys",
    "QuicHelloAssembler",
    "client_initial_keys",
    "looks_like_initial",
    "quic_initial_sni",
]

VERSION_1: Final = 0x00000001
VERSION_2: Final = 0x6B3343CF
MAX_CID: Final = 20
FRAME_PADDING: Final = 0x00
FRAME_PING: Final = 0x01
FRAME_ACK: Final = 0x02
FRAME_ACK_ECN: Final = 0x03
FRAME_CRYPTO: Final = 0x06
#: Most CRYPTO-stream bytes collected per flow.
MAX_HELLO_BYTES: Final = MAX_HANDSHAKE_BYTES
MAX_CACHED_KEYS: Final = 4


class _Version(NamedTuple):
    salt: bytes
    label_prefix: bytes
    initial_type: int  # the long packet type bits (b0 >> 4 & 3) of Initial
    retry_type: int


_VERSIONS: Final[dict[int, _Version]] = {
    VERSION_1: _Version(
        salt=bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),
        label_prefix=b"quic ", initial_type=0, retry_type=3),
    VERSION_2: _Version(
        salt=bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"),
        label_prefix=b"quicv2 ", initial_type=1, retry_type=0),
}


class InitialKeys(NamedTuple):
    """AEAD key, IV and header-protection key of one side's Initial packets."""

    key: bytes
    iv: bytes
    hp: bytes


def looks_like_initial(datagram: bytes) -> bool:
    """The cheap prefilter: a long-header Initial packet of a supported version."""
    if len(datagram) < 7 or datagram[0] & 0xC0 != 0xC0:
        return False
    version = _VERSIONS.get(int.from_bytes(datagram[1:5], "big"))
    return version is not None and (datagram[0] >> 4) & 3 == version.initial_type


def _expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """TLS 1.3 HKDF-Expand-Label with an empty context (RFC 8446 section 7.1)."""
    # cryptography is imported on first use: most captures hold no QUIC Initial.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    return HKDFExpand(algorithm=hashes.SHA256(), length=length, info=info).derive(secret)


def client_initial_keys(dcid: bytes, version: int = VERSION_1) -> InitialKeys:
    """The client's Initial keys for the original Destination Connection ID (RFC 9001 5.2)."""
    v = _VERSIONS[version]
    initial_secret = hmac.new(v.salt, dcid, hashlib.sha256).digest()  # HKDF-Extract
    secret = _expand_label(initial_secret, b"client in", 32)
    return InitialKeys(
        key=_expand_label(secret, v.label_prefix + b"key", 16),
        iv=_expand_label(secret, v.label_prefix + b"iv", 12),
        hp=_expand_label(secret, v.label_prefix + b"hp", 16),
    )


def _varint(data: bytes, pos: int) -> tuple[int, int] | None:
    """The variable-length integer at ``pos`` and the position after it (RFC 9000 16)."""
    if pos >= len(data):
        return None
    size = 1 << (data[pos] >> 6)
    if pos + size > len(data):
        return None
    value = int.from_bytes(data[pos:pos + size], "big") & ((1 << (8 * size - 2)) - 1)
    return value, pos + size


def _crypto_frames(payload: bytes) -> list[tuple[int, bytes]] | None:
    """(offset, data) of the CRYPTO frames of a decrypted Initial payload.

    PADDING, PING and ACK are skipped; the walk stops at any other frame.
    None when the frames are malformed.
    """
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(payload):
        got = _varint(payload, pos)
        if got is None:
            return None
        frame, pos = got
        if frame in (FRAME_PADDING, FRAME_PING):
            continue
        if frame in (FRAME_ACK, FRAME_ACK_ECN):
            fields = [0, 0, 0, 0]  # largest, delay, range count, first range
            for i in range(4):
                got = _varint(payload, pos)
                if got is None:
                    return None
                fields[i], pos = got
            extra = 2 * fields[2] + (3 if frame == FRAME_ACK_ECN else 0)
            if extra > len(payload):
                return None
            for _ in range(extra):
                got = _varint(payload, pos)
                if got is None:
                    return None
                pos = got[1]
            continue
        if frame != FRAME_CRYPTO:
            break
        got_offset = _varint(payload, pos)
        if got_offset is None:
            return None
        offset, pos = got_offset
        got_length = _varint(payload, pos)
        if got_length is None or got_length[1] + got_length[0] > len(payload):
            return None
        length, pos = got_length
        out.append((offset, payload[pos:pos + length]))
        pos += length
    return out


class QuicHelloAssembler:
    """Collects the client's ClientHello from the Initial datagrams of one flow.

    :meth:`feed` answers the flow's state after each datagram: the name once
    the whole ClientHello is in (and on every later call), ``None`` while
    nothing decryptable was seen or when the ClientHello carries no valid name,
    or :class:`Incomplete` with the number of CRYPTO-stream bytes needed.
    """

    def __init__(self) -> None:
        self._keys: dict[tuple[int, bytes], InitialKeys] = {}
        self._buf = bytearray(MAX_HELLO_BYTES)
        self._ranges: list[tuple[int, int]] = []  # merged, sorted [start, end)
        self._done = False
        self._result: str | None = None

    def feed(self, datagram: bytes) -> str | Incomplete | None:
        """Add one UDP payload sent by the client; the flow's result so far."""
        if self._done:
            return self._result
        try:
            chunks = self._initial_crypto(bytes(datagram))
        except (ValueError, TypeError, OverflowError):  # defensive: never raise
            chunks = []
        for offset, data in chunks:
            self._add(offset, data)
        return self._state()

    def _state(self) -> str | Incomplete | None:
        if not self._ranges or self._ranges[0][0] != 0:
            return Incomplete(4) if self._ranges else None
        have = self._ranges[0][1]
        if have < 4:
            return Incomplete(4)
        total = 4 + int.from_bytes(self._buf[1:4], "big")
        if self._buf[0] != 1 or total > MAX_HELLO_BYTES:
            self._done = True
            return None
        if have < total:
            return Incomplete(total)
        self._done = True
        self._result = hello_sni(bytes(self._buf[:total]))
        return self._result

    def _add(self, offset: int, data: bytes) -> None:
        end = min(offset + len(data), MAX_HELLO_BYTES)
        if offset >= end:
            return
        self._buf[offset:end] = data[:end - offset]
        ranges = [*self._ranges, (offset, end)]
        ranges.sort()
        merged: list[tuple[int, int]] = []
        for start, stop in ranges:
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
            else:
                merged.append((start, stop))
        self._ranges = merged

    def _client_keys(self, version: int, dcid: bytes) -> InitialKeys:
        keys = self._keys.get((version, dcid))
        if keys is None:
            if len(self._keys) >= MAX_CACHED_KEYS:
                self._keys.clear()
            keys = self._keys[(version, dcid)] = client_initial_keys(dcid, version)
        return keys

    def _initial_crypto(self, datagram: bytes) -> list[tuple[int, bytes]]:
        """CRYPTO frames of every client Initial packet coalesced in ``datagram``."""
        out: list[tuple[int, bytes]] = []
        pos = 0
        while pos + 7 <= len(datagram):
            b0 = datagram[pos]
            if b0 & 0xC0 != 0xC0:  # short header (or not QUIC): the rest is opaque
                break
            version_id = int.from_bytes(datagram[pos + 1:pos + 5], "big")
            version = _VERSIONS.get(version_id)
            if version is None:
                break
            p = pos + 5
            dcid_len = datagram[p]
            dcid = datagram[p + 1:p + 1 + dcid_len]
            p += 1 + dcid_len
            if dcid_len > MAX_CID or p >= len(datagram) or datagram[p] > MAX_CID:
                break
            p += 1 + datagram[p]
            packet_type = (b0 >> 4) & 3
            if packet_type == version.retry_type:
                break
            if packet_type == version.initial_type:
                token = _varint(datagram, p)
                if token is None:
                    break
                p = token[1] + token[0]
            length = _varint(datagram, p)
            if length is None:
                break
            pn_offset = length[1]
            end = pn_offset + length[0]
            if end > len(datagram):
                break
            if packet_type == version.initial_type:
                keys = self._client_keys(version_id, dcid)
                payload = _unprotect(datagram[pos:end], pn_offset - pos, keys)
                if payload is not None:
                    frames = _crypto_frames(payload)
                    if frames:
                        out.extend(frames)
            pos = end
        return out


def _unprotect(packet: bytes, pn_offset: int, keys: InitialKeys) -> bytes | None:
    """The decrypted payload of one long-header packet, or None (RFC 9001 5.3, 5.4)."""
    if pn_offset + 4 + 16 > len(packet):
        return None
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    sample = packet[pn_offset + 4:pn_offset + 20]
    encryptor = Cipher(algorithms.AES(keys.hp), modes.ECB()).encryptor()
    mask = encryptor.update(sample) + encryptor.finalize()
    b0 = packet[0] ^ (mask[0] & 0x0F)
    pn_len = (b0 & 0x03) + 1
    protected_pn = packet[pn_offset:pn_offset + pn_len]
    pn_bytes = bytes(x ^ m for x, m in zip(protected_pn, mask[1:1 + pn_len], strict=True))
    header = bytes([b0]) + packet[1:pn_offset] + pn_bytes
    # The client's first Initial packets are numbered from 0, so the truncated
    # number is the full one (RFC 9000 A.3 with no packet received yet).
    pn = int.from_bytes(pn_bytes, "big")
    nonce = bytes(a ^ b for a, b in zip(keys.iv, pn.to_bytes(12, "big"), strict=True))
    try:
        return AESGCM(keys.key).decrypt(nonce, packet[pn_offset + pn_len:], header)
    except (InvalidTag, ValueError):
        return None


def quic_initial_sni(datagram: bytes) -> str | Incomplete | None:
    """The SNI of the ClientHello in one UDP payload of a QUIC client.

    :class:`Incomplete` when the ClientHello continues in a later datagram;
    feed those to a :class:`QuicHelloAssembler` instead.
    """
    return QuicHelloAssembler().feed(datagram)
