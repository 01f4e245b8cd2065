"""What every packet source gives the pipeline.

A source yields :class:`~egressd.model.RecordBatch` objects.  File readers
(:mod:`egressd.sources.pcap`, :mod:`egressd.sources.pcapng`) take an open binary
file object, never a path, so that tests can feed them ``BytesIO`` and the CLI
can feed them gzip streams or stdin.  What a reader learned about its input
(format, link types, damage) is kept in a :class:`CaptureInfo`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from egressd.model import RecordBatch


class CaptureError(ValueError):
    """The input is not a capture file this reader understands at all.

    Raised before any record is read; the CLI turns it into exit status 2.
    Damage *after* the header never raises: the reader stops at the damage and
    reports it in :attr:`CaptureInfo.truncated` / :attr:`CaptureInfo.damage`.
    """


@dataclass(slots=True)
class CaptureInfo:
    """What a reader found while reading one capture (filled in as it reads)."""

    format: str
    """``pcap`` or ``pcapng``."""
    link_types: set[int] = field(default_factory=set)
    packets: int = 0
    """Packet records read (records before any damage)."""
    truncated: bool = False
    """True when the file ended inside a record or a record was unreadable."""
    damage: str | None = None
    """One line saying what was wrong and at which byte offset, when truncated."""
    skipped_blocks: dict[str, int] = field(default_factory=dict)
    """pcapng blocks that carry no packet and were skipped, by kind (informational)."""


class CaptureReader(Protocol):
    """A capture file reader: iterate :meth:`batches`, then read :attr:`info`."""

    info: CaptureInfo

    def batches(self) -> Iterator[RecordBatch]: ...
