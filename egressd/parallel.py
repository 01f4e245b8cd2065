"""An audit on several cores: ``egressd audit --jobs N``.

Flows of different 5-tuples never influence each other: what ends a flow (a
teardown, an idle gap, a new SYN) is decided by its own packets.  So ``N``
processes that read the same captures, and each keep only the flows whose
key hash falls in their share (:attr:`FlowTable.partition`), together find
exactly the flows one process would; the report is byte-identical whatever
``N``.  What every process does in full — reading, decoding, fragment
reassembly, names (DNS answers name flows of every share) — gives each the same
packet counts and decode errors; what is split is the per-flow work (the flow
table, GeoIP, policy, Community ID), which is most of an audit with many
flows.  The first share runs in the calling process, which also computes the
captures' SHA-256; the others are forked before anything is read and send
their flows back through a pipe.

Two limits on the speed-up: every process reads and decodes every packet,
and the SHA-256 of the captures (sequential by nature) runs in one process,
on a core of its own.  On two cores the extra process costs more than it
saves (see bench/README.md), so ``default_jobs`` uses several processes only
from :data:`MIN_CORES` cores on, for large inputs, and never for standard
input (which can be read only once).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from egressd.sources.inputs import input_size

if TYPE_CHECKING:
    # Imported where used: the command line asks default_jobs() before it
    # loads the pipeline, and must not wait for it to do so.
    from egressd.audit import AuditOptions
    from egressd.geo import Resolver
    from egressd.model import FlowRecord
    from egressd.policy import Policy

MIN_PARALLEL_BYTES = 64 * 1024 * 1024
"""Below this much input an audit takes a second or two: not worth more processes."""
MAX_DEFAULT_JOBS = 8
MIN_CORES = 4
"""With fewer cores the default is one process: the SHA-256 of the captures needs one."""


def available_cores() -> int:
    """CPUs this process may run on (its affinity, not just the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_jobs(paths: Sequence[str]) -> int:
    """How many processes ``--jobs`` means when not given.

    One less than the cores available (one is left to the SHA-256 of the
    captures), at most :data:`MAX_DEFAULT_JOBS`, for inputs of at least
    :data:`MIN_PARALLEL_BYTES` on machines with :data:`MIN_CORES` cores or more;
    else 1.
    """
    if "-" in paths:
        return 1
    cores = available_cores()
    if cores < MIN_CORES or sum(input_size(p) or 0 for p in paths) < MIN_PARALLEL_BYTES:
        return 1
    return min(cores - 1, MAX_DEFAULT_JOBS)


@dataclass(frozen=True, slots=True)
class _Failure:
    """What a worker sends back instead of flows when it failed."""

    error: BaseException
    text: str


class ParallelAudit:
    """Runs the shares 1..N-1 of an audit in forked processes.

    Create it (which forks) before reading anything or starting threads, run
    share 0 in :attr:`audit` as a normal :class:`Audit`, then :meth:`collect`
    the other shares' flows for :meth:`Audit.finish`.
    """

    def __init__(self, policy: Policy, resolver: Resolver, options: AuditOptions,
                 paths: Sequence[str], jobs: int) -> None:
        if jobs < 1:
            raise ValueError("jobs must be at least 1")
        if jobs > 1 and "-" in paths:
            raise ValueError("standard input can be read by one process only (use --jobs 1)")
        self.jobs = jobs
        from egressd.audit import Audit

        self.audit = Audit(policy, resolver, replace(options, partition=(0, jobs)))
        self._workers: list[tuple[Any, Connection]] = []
        ctx = multiprocessing.get_context("fork")
        for index in range(1, jobs):
            receiver, sender = ctx.Pipe(duplex=False)
            share = replace(options, partition=(index, jobs), sha256=False)
            proc = ctx.Process(target=_work, args=(policy, resolver, share, list(paths), sender),
                               name=f"egressd-audit-{index}", daemon=True)
            proc.start()
            sender.close()
            self._workers.append((proc, receiver))

    def collect(self) -> list[FlowRecord]:
        """The flows of every other share; re-raises a worker's error."""
        flows: list[FlowRecord] = []
        failure: _Failure | None = None
        for proc, conn in self._workers:
            try:
                got = pickle.loads(conn.recv_bytes())
            except EOFError:
                got = _Failure(RuntimeError(f"{proc.name} ended without a result "
                                            f"(exit status {proc.exitcode})"), "")
            finally:
                conn.close()
            proc.join()
            if isinstance(got, _Failure):
                failure = failure or got
            else:
                flows.extend(got)
        if failure is not None:
            raise failure.error
        return flows

    def close(self) -> None:
        """Stop workers that are still running (after an error in share 0)."""
        for proc, conn in self._workers:
            conn.close()
            if proc.is_alive():
                proc.terminate()
            proc.join()
        self._workers.clear()


def _work(policy: Policy, resolver: Resolver, options: AuditOptions, paths: list[str],
          conn: Connection) -> None:
    """One share of the audit, in a forked process."""
    from egressd.audit import Audit, gc_paused

    try:
        with gc_paused():
            audit = Audit(policy, resolver, options)
            for path in paths:
                audit.add_capture(path)
            result: object = audit.finish_flows()
    except BaseException as e:  # sent to the parent, which reports it
        result = _Failure(e, traceback.format_exc())
    try:
        conn.send_bytes(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    finally:
        conn.close()
        os._exit(0)
