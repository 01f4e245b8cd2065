"""A memory-mapped ``PACKET_RX_RING`` (``TPACKET_V3``) of one packet socket.

With a receive ring the kernel writes frames straight into memory shared
with the process, packed back to back in large blocks, instead of queueing one
socket buffer per frame for ``recvmsg``.  A block is handed to user space
when it is full or when ``retire_ms`` have passed since its first frame; the
reader turns the whole block into one :class:`~egressd.model.RecordBatch`
(the block bytes are copied once, the record headers are read with numpy)
and gives the block back to the kernel at once.  One system call per block
instead of one per frame is what makes busy links cheap.

Layouts (linux/if_packet.h):

* ``struct tpacket_block_desc``: ``version``, ``offset_to_priv``, then
  ``tpacket_hdr_v1``: ``block_status``, ``num_pkts``,
  ``offset_to_first_pkt``, ``blk_len`` (all ``__u32``), …
* ``struct tpacket3_hdr``: ``tp_next_offset``, ``tp_sec``, ``tp_nsec``,
  ``tp_snaplen``, ``tp_len``, ``tp_status`` (``__u32``), ``tp_mac``,
  ``tp_net`` (``__u16``), …  Headers start at 16-byte aligned offsets.
"""

from __future__ import annotations

import contextlib
import mmap
import socket
import struct

import numpy as np

from egressd.model import RecordBatch

SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_VERSION = 10
TPACKET_V1 = 0
TPACKET_V3 = 2
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1

BLOCK_SIZE = 1 << 20
"""Bytes per block when the ring is large enough for it."""
FRAME_SIZE = 2048
"""Nominal frame size the kernel checks the request with (V3 packs frames of any size)."""

_REQ3 = struct.Struct("=7I")  # struct tpacket_req3
_BLOCK = struct.Struct("=6I")  # tpacket_block_desc up to blk_len
_STATUS = struct.Struct("=I")
_STATUS_OFF = 8
_NUM_PKTS_OFF = 12
STATS_V3 = struct.Struct("=III")  # struct tpacket_stats_v3: packets, drops, freeze_q_cnt


def ring_geometry(ring_bytes: int) -> tuple[int, int]:
    """``(block size, block count)`` for a ring of about ``ring_bytes``.

    Blocks are :data:`BLOCK_SIZE` unless the ring is smaller than eight of
    them; then the largest power-of-two number of pages that gives eight (but
    at least one page, and at least two blocks).  A frame longer than a block
    holds is cut by the kernel (its real length is still reported).
    """
    page = mmap.PAGESIZE
    block = BLOCK_SIZE
    while block > page and 8 * block > ring_bytes:
        block //= 2
    return block, min(max(2, ring_bytes // block), 0xFFFF_FFFF)


class RxRing:
    """The receive ring of one socket (set up before the socket is bound to a protocol)."""

    __slots__ = ("block_size", "blocks", "cur", "mm", "retire_ms")

    def __init__(self, sock: socket.socket, ring_bytes: int, retire_ms: int) -> None:
        self.block_size, self.blocks = ring_geometry(ring_bytes)
        self.retire_ms = max(1, retire_ms)
        self.cur = 0
        frames = min(self.block_size // FRAME_SIZE * self.blocks, 0xFFFF_FFFF)
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        try:
            req = _REQ3.pack(self.block_size, self.blocks, FRAME_SIZE, frames,
                             self.retire_ms, 0, 0)
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
            try:
                self.mm = mmap.mmap(sock.fileno(), self.block_size * self.blocks,
                                    mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except BaseException:
                sock.setsockopt(SOL_PACKET, PACKET_RX_RING, _REQ3.pack(0, 0, 0, 0, 0, 0, 0))
                raise
        except BaseException:
            # Leave the socket as it was, for the recvmsg path.
            with contextlib.suppress(OSError):
                sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V1)
            raise

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # only copies leave this module
            self.mm.close()

    def filling(self) -> bool:
        """Whether the kernel holds frames in the next block that it has not handed over yet."""
        base = self.cur * self.block_size
        mm = self.mm
        status: int = _STATUS.unpack_from(mm, base + _STATUS_OFF)[0]
        return not status & TP_STATUS_USER and _STATUS.unpack_from(mm, base + _NUM_PKTS_OFF)[0] > 0

    def take(self, linktype: int, snaplen: int) -> RecordBatch | None:
        """The next block as one batch (its bytes copied, the block returned), or None."""
        size = self.block_size
        base = self.cur * size
        mm = self.mm
        _v, _p, status, n, first, used = _BLOCK.unpack_from(mm, base)
        if not status & TP_STATUS_USER:
            return None
        # Copy up to the end of the last frame (rounded so that it can be read
        # as 32-bit words), then hand the block back.
        used = min(size, (max(used, first) + 15) & ~15)
        data = np.frombuffer(mm, dtype=np.uint8, count=used, offset=base).copy()
        _STATUS.pack_into(mm, base + _STATUS_OFF, TP_STATUS_KERNEL)
        self.cur = (self.cur + 1) % self.blocks
        return parse_block(data, n, first, linktype, snaplen)

    def take_into(self, out: list[RecordBatch], limit: int, linktype: int, snaplen: int,
                  most: int) -> int:
        """Append up to ``limit`` ready blocks to ``out`` as batches of at most ``most``
        records; how many blocks there were."""
        for taken in range(limit):
            batch = self.take(linktype, snaplen)
            if batch is None:
                return taken
            if len(batch) <= most:
                out.append(batch)
                continue
            # Records of one block share its buffer; only the index arrays are cut.
            for lo in range(0, len(batch), most):
                hi = lo + most
                out.append(RecordBatch(batch.data, batch.offsets[lo:hi], batch.caplens[lo:hi],
                                       batch.wirelens[lo:hi], batch.ts_ns[lo:hi],
                                       batch.linktypes[lo:hi]))
        return limit


def parse_block(data: np.ndarray, n: int, first: int, linktype: int,
                snaplen: int) -> RecordBatch:
    """The records of a copied block: ``n`` frame headers chained from offset ``first``."""
    words = memoryview(data[: len(data) & ~3]).cast("I")  # type: ignore[arg-type]
    limit = len(data) - 20
    hdrs: list[int] = []
    off = first
    for _ in range(n):
        if off > limit or off & 3:
            break  # a damaged chain: keep the records before it
        hdrs.append(off)
        step = words[off >> 2]
        if not step:
            break  # the last frame of the block
        off += step
    hdr = np.array(hdrs, dtype=np.int64)
    u32 = data[: len(data) & ~3].view(np.uint32)
    q = hdr >> 2
    sec = u32[q + 1].astype(np.int64)
    nsec = u32[q + 2].astype(np.int64)
    caplens = np.minimum(u32[q + 3].astype(np.int64), snaplen)
    wirelens = u32[q + 4].astype(np.int64)
    mac = data[: len(data) & ~1].view(np.uint16)[(hdr >> 1) + 12].astype(np.int64)
    offsets = hdr + mac
    np.minimum(caplens, np.maximum(len(data) - offsets, 0), out=caplens)
    return RecordBatch(data, offsets, caplens, wirelens, sec * 1_000_000_000 + nsec,
                       np.full(len(hdr), linktype, dtype=np.uint16))
