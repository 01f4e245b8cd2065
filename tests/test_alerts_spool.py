"""The durable spool: order, restarts, the bound, damaged files, unusable directories."""

from __future__ import annotations

import errno
import json
import os
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_alerts_dedup import SEC, T0, RecordingSink, flow, metrics, sample

from egressd.alerts import Alerter, Spool, SpoolOptions, decode_alert, encode_alert
from egressd.alerts.sinks import AlertRejected
from egressd.alerts.spool import COMMIT_FILE, backoff_delay
from egressd.config import AlertsConfig
from egressd.metrics import Metrics
from egressd.model import Alert, GeoInfo, Initiator, NameSource, Reason, Verdict, VerdictKind

FAST = SpoolOptions(batch_size=4, backoff_initial=0.01, backoff_max=0.05, idle_poll=0.05,
                    lock_wait=2.0)


def alert(i: int) -> Alert:
    return Alert(flow(cid=f"1:a{i:05d}", bytes_out=i), "gw1", "eth0", f"g{i}", T0 + i * SEC, 1)


def ids(alerts: Sequence[Alert]) -> list[int]:
    return [a.record.bytes_out for a in alerts]


class Sink(RecordingSink):
    """Records batches; ``fail`` → OSError; alerts in ``reject`` → AlertRejected."""

    def __init__(self) -> None:
        super().__init__("am", spooled=True, refresh=True)
        self.batches: list[int] = []
        self.reject: set[int] = set()
        self.calls = 0

    def deliver(self, batch: Sequence[Alert]) -> None:
        self.calls += 1
        if self.fail:
            raise ConnectionRefusedError("down")
        if set(ids(batch)) & self.reject:
            raise AlertRejected("HTTP 400")
        self.batches.append(len(batch))
        self.got.extend(batch)


def segments(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.suffix == ".jsonl")


def make(path: Path, sink: Sink, m: Metrics | None = None, max_bytes: int = 10_000_000,
         options: SpoolOptions = FAST) -> Spool:
    return Spool(str(path), sink, max_bytes=max_bytes, metrics=m, options=options)


# -- the line format ---------------------------------------------------------------------

TEXT = st.one_of(st.none(), st.text(max_size=8))


@settings(max_examples=100, deadline=None)
@given(country=TEXT, zone=TEXT, route=TEXT, sensor=st.text(max_size=8), iface=TEXT,
       port=st.one_of(st.none(), st.integers(0, 65535)), count=st.integers(1, 10**6),
       reason=st.one_of(st.none(), st.sampled_from(list(Reason))),
       initiator=st.one_of(st.none(), st.sampled_from(list(Initiator))),
       name=st.one_of(st.none(), st.tuples(st.text(max_size=8),
                                           st.sampled_from(list(NameSource)))))
def test_encode_decode_round_trip(country: str | None, zone: str | None, route: str | None,
                                  sensor: str, iface: str | None, port: int | None, count: int,
                                  reason: Reason | None, initiator: Initiator | None,
                                  name: tuple[str, NameSource] | None) -> None:
    rec = flow(zone=zone, route=route, dst_port=port, reason=reason)._replace(
        geo=GeoInfo(country, None, None, zone), initiator=initiator,
        verdict=Verdict(VerdictKind.UNKNOWN, route, zone, reason),
        server_name=name[0] if name else None, name_source=name[1] if name else None)
    a = Alert(rec, sensor, iface, "grp\n|x", 12345, count)
    line = encode_alert(a)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_alert(line[:-1]) == a


@pytest.mark.parametrize("line", [b"", b"{", b"[]", b'{"v":2}', b'{"v":1,"flow":{}}',
                                  encode_alert(alert(1))[:-20], b"\xff\xfe"])
def test_decode_refuses_damaged_lines(line: bytes) -> None:
    with pytest.raises(ValueError):
        decode_alert(line)


def test_spool_lines_written_before_names_existed_still_decode() -> None:
    obj = json.loads(encode_alert(alert(1)))
    del obj["flow"]["server_name"], obj["flow"]["name_source"]
    got = decode_alert(json.dumps(obj).encode())
    assert (got.record.server_name, got.record.name_source) == (None, None)
    assert got == alert(1)


def test_decode_refuses_wrong_types() -> None:
    obj = json.loads(encode_alert(alert(1)))
    obj["flow"]["bytes_out"] = True
    with pytest.raises(ValueError):
        decode_alert(json.dumps(obj).encode())
    obj["flow"]["bytes_out"] = 1
    obj["flow"]["verdict"]["reason"] = "no_such_reason"
    with pytest.raises(ValueError):
        decode_alert(json.dumps(obj).encode())


# -- delivery --------------------------------------------------------------------------------


def test_delivers_in_order_in_batches_and_cleans_up(tmp_path: Path) -> None:
    sink, m = Sink(), metrics()
    spool = make(tmp_path / "s", sink, m, options=SpoolOptions(
        batch_size=4, idle_poll=0.05, segment_bytes=2000))
    for i in range(30):
        assert spool.append(alert(i))
    assert spool.flush(5.0)
    assert spool.close(5.0)
    assert ids(sink.got) == list(range(30))
    assert max(sink.batches) <= 4
    assert sample(m, "egressd_alerts_sent_total", sink="am") == 30
    assert sample(m, "egressd_alerts_spooled", sink="am") == 0
    # Delivered segments are deleted (the newest stays while it is written to).
    assert len(segments(tmp_path / "s")) <= 1
    assert oct((tmp_path / "s").stat().st_mode & 0o777) == oct(0o700)


def test_sink_failures_back_off_and_retry_the_same_batch(tmp_path: Path) -> None:
    sink, m = Sink(), metrics()
    sink.fail = True
    spool = make(tmp_path / "s", sink, m)
    for i in range(6):
        spool.append(alert(i))
    assert not spool.flush(0.2)
    assert spool.waiting == 6
    assert sample(m, "egressd_alerts_spooled", sink="am") == 6
    failed = sample(m, "egressd_alerts_failed_total", sink="am")
    assert failed >= 3  # backoff 5-10 ms, then 10-20 ms, … capped at 50 ms
    assert failed == sink.calls
    sink.fail = False
    assert spool.flush(5.0)
    spool.close()
    assert ids(sink.got) == list(range(6))


def test_backoff_delay_is_exponential_with_jitter_and_capped() -> None:
    opts = SpoolOptions(backoff_initial=0.5, backoff_max=60.0)
    low, high = random.Random(), random.Random()
    low.uniform = lambda a, b: a  # type: ignore[method-assign]
    high.uniform = lambda a, b: b  # type: ignore[method-assign]
    assert [backoff_delay(n, opts, high) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert [backoff_delay(n, opts, low) for n in (1, 2, 3)] == [0.25, 0.5, 1.0]
    assert backoff_delay(30, opts, high) == 60.0
    assert backoff_delay(10_000, opts, low) == 30.0
    rng = random.Random(1)
    assert all(2.0 <= backoff_delay(4, opts, rng) <= 4.0 for _ in range(100))


def test_rejected_alerts_are_discarded_one_by_one(tmp_path: Path) -> None:
    sink, m = Sink(), metrics()
    sink.reject = {2, 5}
    spool = make(tmp_path / "s", sink, m)
    for i in range(8):
        spool.append(alert(i))
    assert spool.flush(5.0)
    spool.close()
    assert ids(sink.got) == [0, 1, 3, 4, 6, 7]
    assert spool.rejected == 2
    assert sample(m, "egressd_alerts_failed_total", sink="am") == 2


# -- restarts ------------------------------------------------------------------------------


def test_restart_resumes_from_the_committed_offset(tmp_path: Path) -> None:
    d = tmp_path / "s"
    sink = Sink()
    spool = make(d, sink)
    for i in range(5):
        spool.append(alert(i))
    assert spool.flush(5.0)
    sink.fail = True
    for i in range(5, 12):
        spool.append(alert(i))
    assert not spool.flush(0.1)
    assert spool.close(5.0)
    assert json.loads((d / COMMIT_FILE).read_text())["offset"] > 0

    again, m = Sink(), metrics()
    spool = make(d, again, m)
    spool.append(alert(12))
    assert spool.flush(5.0)
    spool.close()
    assert ids(sink.got) == list(range(5))
    assert ids(again.got) == list(range(5, 13))  # nothing twice, nothing lost, in order
    assert sample(m, "egressd_alerts_sent_total", sink="am") == 8


def test_close_writes_out_everything_queued(tmp_path: Path) -> None:
    sink = Sink()
    sink.fail = True
    spool = make(tmp_path / "s", sink)
    for i in range(500):
        spool.append(alert(i))
    assert spool.close(5.0)
    assert spool.append(alert(999)) is False  # closed
    again = Sink()
    spool = make(tmp_path / "s", again)
    assert spool.flush(5.0)
    spool.close()
    assert ids(again.got) == list(range(500))


def test_a_second_spool_waits_for_the_directory_lock(tmp_path: Path) -> None:
    first, second = Sink(), Sink()
    a = make(tmp_path / "s", first)
    assert a.wait_open(5.0)
    b = make(tmp_path / "s", second)
    b.append(alert(1))
    time.sleep(0.1)
    assert second.got == [] and b.waiting == 1  # waiting for the lock, not dropped
    a.close()
    assert b.flush(5.0)
    b.close()
    assert ids(second.got) == [1]


def test_a_spool_that_cannot_get_the_lock_drops_and_counts(tmp_path: Path) -> None:
    m = metrics()
    holder = make(tmp_path / "s", Sink())
    assert holder.wait_open(5.0)
    late = make(tmp_path / "s", Sink(), m, options=SpoolOptions(lock_wait=0.1, idle_poll=0.05))
    assert not late.wait_open(5.0)
    late.append(alert(1))
    assert late.flush(2.0)
    assert sample(m, "egressd_alerts_dropped_total", sink="am") == 1
    late.close()
    holder.close()


# -- bound, damage, unusable directories ----------------------------------------------------------


def test_full_spool_drops_new_alerts_and_counts_them(tmp_path: Path) -> None:
    sink, m = Sink(), metrics()
    sink.fail = True
    size = len(encode_alert(alert(0)))
    spool = make(tmp_path / "s", sink, m, max_bytes=size * 5 + 10)
    start = time.perf_counter()
    accepted = [spool.append(alert(i)) for i in range(8)]
    assert time.perf_counter() - start < 0.05
    assert accepted == [True] * 5 + [False] * 3
    assert spool.dropped == 3
    assert sample(m, "egressd_alerts_dropped_total", sink="am") == 3
    assert sample(m, "egressd_alerts_spooled", sink="am") == 5
    sink.fail = False
    assert spool.flush(5.0)
    assert spool.append(alert(8))  # room again once delivered
    assert spool.flush(5.0)
    spool.close()
    assert ids(sink.got) == [0, 1, 2, 3, 4, 8]


def test_line_cut_short_by_a_crash_is_skipped_and_counted(tmp_path: Path) -> None:
    d = tmp_path / "s"
    d.mkdir()
    good = b"".join(encode_alert(alert(i)) for i in range(3))
    (d / "0000000000000001.jsonl").write_bytes(good + encode_alert(alert(3))[:40])
    (d / "0000000000000002.jsonl").write_bytes(
        encode_alert(alert(4)) + b"garbage\n" + encode_alert(alert(5)))
    sink, m = Sink(), metrics()
    spool = make(d, sink, m)
    spool.append(alert(6))
    assert spool.flush(5.0)
    spool.close()
    assert ids(sink.got) == [0, 1, 2, 4, 5, 6]
    assert spool.corrupt == 2
    assert sample(m, "egressd_alerts_dropped_total", sink="am") == 2
    assert sample(m, "egressd_alerts_spooled", sink="am") == 0


def test_unreadable_commit_file_means_from_the_start(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "s"
    d.mkdir()
    (d / "0000000000000001.jsonl").write_bytes(encode_alert(alert(1)))
    (d / COMMIT_FILE).write_text("{not json")
    sink = Sink()
    spool = make(d, sink)
    assert spool.flush(5.0)
    spool.close()
    assert ids(sink.got) == [1]
    assert any("unreadable" in r.getMessage() for r in caplog.records)


def test_unusable_directory_drops_counts_and_recovers(tmp_path: Path) -> None:
    # Tests run as root, where permissions do not stop writes: put a file where
    # the spool directory's parent should be.
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")
    sink, m = Sink(), metrics()
    spool = make(blocker / "spool", sink, m)
    for i in range(3):
        assert spool.append(alert(i)) is True  # accepted into memory, then dropped
    assert spool.flush(2.0)
    assert spool.dropped == 3
    assert sample(m, "egressd_alerts_dropped_total", sink="am") == 3
    assert sample(m, "egressd_alerts_spooled", sink="am") == 0
    blocker.unlink()
    blocker.mkdir()
    spool.append(alert(3))
    assert spool.flush(5.0)
    spool.close()
    assert ids(sink.got) == [3]


def test_write_error_drops_the_batch_and_leaves_no_partial_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink, m = Sink(), metrics()
    sink.fail = True
    spool = make(tmp_path / "s", sink, m)
    spool.append(alert(0))
    deadline = time.monotonic() + 5
    while not any(p.stat().st_size for p in (tmp_path / "s").glob("*.jsonl")):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    real_write = os.write
    fail = threading.Event()
    fail.set()

    def full_disk(fd: int, data: bytes | memoryview) -> int:
        if fail.is_set() and fd == spool._fd:
            fail.clear()
            real_write(fd, bytes(data)[:17])  # a partial line, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    spool.append(alert(1))
    deadline = time.monotonic() + 5
    while spool.dropped == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    spool.append(alert(2))
    sink.fail = False
    assert spool.flush(5.0)
    spool.close()
    assert ids(sink.got) == [0, 2]
    assert spool.dropped == 1 and spool.corrupt == 0
    assert sample(m, "egressd_alerts_dropped_total", sink="am") == 1


def test_alerter_with_an_unusable_spool_never_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("x")
    m = metrics()
    cfg = AlertsConfig(alertmanager="http://127.0.0.1:9", suppress_seconds=0.0,
                       spool_dir=str(blocker / "spool"))
    with Alerter(cfg, sensor="gw1", metrics=m, spool_options=FAST) as alerter:
        for i in range(5):
            start = time.perf_counter()
            assert alerter.observe(flow(bytes_out=i), interface=None, now_ns=T0 + i) is not None
            assert time.perf_counter() - start < 0.05
        assert alerter.flush(2.0)
    assert sample(m, "egressd_alerts_dropped_total", sink="alertmanager") == 5
    assert sample(m, "egressd_alerts_sent_total", sink="alertmanager") == 0
