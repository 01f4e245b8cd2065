"""Offline audit: captures → decode → flows → geo → policy → :class:`AuditResult`.

The same stages run in the live daemon; here the source is a file and the
clock is the packets' own timestamps, so an audit of the same files always
finds the same flows.  Captures given together are read in order into one
flow table, as the rotated files of one long capture (``tcpdump -C``).
"""

from __future__ import annotations

import gc
import gzip
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from egressd.classify import Classifier
from egressd.decode.batch import decode_batch
from egressd.flows import FlowTable, FlowTimeouts
from egressd.geo import Resolver
from egressd.model import FlowRecord, VerdictKind
from egressd.names.tracker import NameTracker
from egressd.policy import Policy
from egressd.report import AuditResult, CaptureSummary
from egressd.sources.files import open_capture
from egressd.sources.inputs import HashingReader, open_input

TRANSIT_WARNING_SHARE = 0.5
"""Above this share of transit flows, the audit warns that internal_networks is likely wrong."""

Progress = Callable[[int], None]
"""Called with the number of bytes read since the last call."""


@dataclass(frozen=True, slots=True)
class AuditOptions:
    timeouts: FlowTimeouts = field(default_factory=FlowTimeouts)
    batch_records: int = 65536
    names: bool = True
    """Read server names (DNS, TLS SNI, QUIC) and give them to flows."""
    dns_entries: int = 100_000
    partition: tuple[int, int] | None = None
    """Keep only one share of the flows (see :mod:`egressd.parallel`)."""
    sha256: bool = True
    """Hash each capture (off in the processes that only contribute flows)."""


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while an audit builds its flow table.

    Flows are plain acyclic objects; with hundreds of thousands of them alive,
    each automatic collection walks them all again, which costs more than the
    audit itself.  Reference counting still frees everything as usual.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class Audit:
    """One audit run: feed it captures with :meth:`add_capture`, then :meth:`finish`."""

    def __init__(self, policy: Policy, resolver: Resolver,
                 options: AuditOptions | None = None) -> None:
        self.policy = policy
        self.resolver = resolver
        self.options = options or AuditOptions()
        self.classifier = Classifier(policy, resolver)
        self.names = (NameTracker(dns_entries=self.options.dns_entries)
                      if self.options.names else None)
        self.table = FlowTable(self.options.timeouts,
                               on_new=self.names.on_new if self.names else None,
                               partition=self.options.partition)
        self.captures: list[CaptureSummary] = []
        self.flows: list[FlowRecord] = []

    def _drain(self) -> None:
        fin = self.table.finished
        if fin:
            classify = self.classifier.classify
            self.flows.extend(classify(f) for f in fin)
            fin.clear()

    def add_capture(self, path: str, *, progress: Progress | None = None,
                    source: HashingReader | None = None) -> CaptureSummary:
        """Read one capture into the flow table.

        ``source`` is the capture already opened with
        :func:`~egressd.sources.inputs.open_input` (the command line starts
        reading before it loads everything else); it is closed here.  Raises
        :class:`~egressd.sources.base.CaptureError` when ``path`` is not a
        capture at all and ``OSError`` when it cannot be read; damage inside a
        capture is reported in the summary instead.
        """
        if source is None:
            source = open_input(path, sha256=self.options.sha256)
        with source as hashing:
            try:
                reader = open_capture(hashing, batch_records=self.options.batch_records)
            except (EOFError, gzip.BadGzipFile) as e:
                raise OSError(f"{path}: {e}") from e
            errors: Counter[str] = Counter()
            first: int | None = None
            last: int | None = None
            seen = 0
            table_errors_before = Counter(self.table.errors)
            for batch in reader.batches():
                if len(batch) == 0:
                    continue
                dec = decode_batch(batch)
                errors.update(dec.error_counts())
                lo, hi = int(batch.ts_ns.min()), int(batch.ts_ns.max())
                first = lo if first is None else min(first, lo)
                last = hi if last is None else max(last, hi)
                if self.names is not None:
                    self.names.observe(batch, dec)
                    self.table.process(dec)
                    self.names.attach(self.table)
                else:
                    self.table.process(dec)
                self._drain()
                if progress is not None:
                    progress(hashing.size - seen)
                    seen = hashing.size
            # Table-level errors (orphan fragments) belong to the capture just read.
            errors.update(self.table.errors - table_errors_before)
            # The readers read to the end of their input: the digest of the whole file.
            digest = hashing.sha256()
        info = reader.info
        summary = CaptureSummary(
            path=path, sha256=digest, format=info.format,
            link_types=sorted(info.link_types), packets=info.packets, bytes=hashing.size,
            first_ns=first, last_ns=last, truncated=info.truncated, damage=info.damage,
            decode_errors=errors)
        if progress is not None:
            progress(hashing.size - seen)
        self.captures.append(summary)
        return summary

    def finish_flows(self) -> list[FlowRecord]:
        """Close every open flow; every flow found so far."""
        self.table.flush()
        self._drain()
        return self.flows

    def finish(self, *, policy_path: str, policy_sha256: str,
               more_flows: Iterable[FlowRecord] = ()) -> AuditResult:
        """Close every open flow and build the result (flows sorted).

        ``more_flows`` are the flows of the other shares of a parallel audit.
        """
        self.finish_flows()
        self.flows.extend(more_flows)
        result = AuditResult(policy_path=policy_path, policy_sha256=policy_sha256,
                             geoip=self.resolver.sources(), captures=self.captures,
                             flows=self.flows, warnings=list(self.policy.warnings))
        result.sort_flows()
        transit = sum(1 for f in self.flows if f.verdict.verdict is VerdictKind.TRANSIT)
        if self.flows and transit / len(self.flows) > TRANSIT_WARNING_SHARE:
            result.warnings.append(
                f"{transit} of {len(self.flows)} flows ({100 * transit / len(self.flows):.0f}%) "
                "have no internal endpoint: internal_networks is probably wrong for this "
                "capture (the flows were not checked against the routes)")
        return result
