"""Command line: ``egressd audit``, ``check-config``, ``lookup``.

Exit status is a contract for scripts and CI jobs:

* 0 — nothing at or above ``--fail-on`` was found (or the command succeeded);
* 1 — findings (violations, or unknown-country exports with ``--fail-on unknown``);
* 2 — usage, configuration or input error, with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import ipaddress
import os
import shutil
import stat
import sys
from collections.abc import Iterator, Sequence
from typing import IO, TYPE_CHECKING, NoReturn

from egressd import __version__
from egressd.parallel import default_jobs
from egressd.sources.inputs import HashingReader, expand_capture_args, input_size, open_input

if TYPE_CHECKING:
    from egressd.audit import Progress
    from egressd.config import Config
    from egressd.flows import FlowTimeouts
    from egressd.geo import CachedResolver
    from egressd.policy import Policy
    from egressd.report import AuditResult

# The pipeline (numpy, pydantic, GeoIP, the decoders) is imported inside the
# commands: `egressd audit` starts reading and hashing its first capture
# before it loads all that, which takes a few hundred milliseconds.

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2
PROGRESS_MIN_BYTES = 16 * 1024 * 1024


class UsageError(Exception):
    """A problem with what the user asked for: one line on stderr, exit 2."""


def _err(msg: str) -> None:
    print(f"egressd: error: {msg}", file=sys.stderr)


def _warn(msg: str) -> None:
    print(f"egressd: warning: {msg}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="egressd",
        description="Shows where data leaves the country and whether an approved export "
                    "route covers it.")
    p.add_argument("--version", action="version", version=f"egressd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser("audit", help="check pcap/pcapng captures against the export policy",
                       description="Replay captures offline and report every flow's "
                                   "destination country and verdict.")
    a.add_argument("--policy", required=True, metavar="FILE",
                   help="policy (or full daemon config) YAML file")
    a.add_argument("--geoip-db", metavar="MMDB",
                   help="MaxMind GeoIP2/GeoLite2 Country or City database "
                        "(default: the embedded registry-country data)")
    a.add_argument("--asn-db", metavar="MMDB", help="MaxMind GeoLite2/GeoIP2 ASN database")
    a.add_argument("--format", choices=("text", "json", "html", "openmetrics"), default="text")
    a.add_argument("--output", "-o", metavar="FILE", help="write the report here (default stdout)")
    a.add_argument("--fail-on", choices=("violation", "unknown", "never"), default="violation",
                   help="exit 1 when a finding at or above this level exists (default violation)")
    a.add_argument("--idle-timeout", action="append", default=[], metavar="PROTO=SECONDS",
                   help="idle timeout that ends a flow, per protocol: tcp, udp or other "
                        "(defaults tcp=300 udp=60 other=30; repeatable)")
    a.add_argument("--tcp-close-grace", type=float, default=5.0, metavar="SECONDS",
                   help="after a TCP teardown, how long late ACKs stay in the flow (default 5)")
    a.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    a.add_argument("--jobs", "-j", type=_jobs, default=None, metavar="N",
                   help="processes sharing the per-flow work (default: one less than the "
                        "cores, from 4 cores and 64 MiB of captures on, else 1; 1 for standard "
                        "input); the report is the same whatever N")
    a.add_argument("--verify", metavar="REPORT.json",
                   help="re-run the audit and compare it with this stored JSON report "
                        "(exit 0: matches, 1: differs, 2: not a readable report)")
    a.add_argument("captures", nargs="+", metavar="CAPTURE",
                   help="pcap/pcapng file (.gz too), a directory of them, or - for stdin")

    r = sub.add_parser("run", help="run the live daemon (capture, alerts, metrics)",
                       description="Capture on the configured interfaces, alert on unapproved "
                                   "exports and serve Prometheus metrics until SIGTERM.")
    r.add_argument("--config", required=True, metavar="FILE", help="daemon config YAML file")
    r.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error"))

    c = sub.add_parser("check-config", help="validate a policy or daemon config file")
    c.add_argument("file", metavar="FILE")

    lk = sub.add_parser("lookup", help="country, ASN and verdict an address would get")
    lk.add_argument("--config", "--policy", dest="config", metavar="FILE",
                    help="policy or daemon config (verdicts need it)")
    lk.add_argument("--geoip-db", metavar="MMDB")
    lk.add_argument("--asn-db", metavar="MMDB")
    lk.add_argument("--proto", default="tcp", help="protocol for the verdict (default tcp)")
    lk.add_argument("--port", type=int, default=443, help="service port (default 443)")
    lk.add_argument("--from", dest="source", metavar="IP",
                    help="internal source address (default: none, i.e. any zone)")
    lk.add_argument("addresses", nargs="+", metavar="IP")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The exact command line, for the report's evidence block.
    args.command_line = list(sys.argv) if argv is None else ["egressd", *argv]
    try:
        if args.command == "audit":
            return cmd_audit(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "check-config":
            return cmd_check_config(args)
        if args.command == "lookup":
            return cmd_lookup(args)
    except KeyboardInterrupt:
        _err("interrupted")
    except Exception as e:
        from egressd.config import ConfigError
        from egressd.sources.base import CaptureError

        if isinstance(e, FileNotFoundError):
            _err(f"{e.filename}: no such file" if e.filename else str(e))
        elif isinstance(e, (ConfigError, CaptureError, UsageError, OSError, ValueError)):
            _err(str(e))
        else:
            raise
    return EXIT_ERROR


def run() -> NoReturn:
    """The ``egressd`` command (and ``python -m egressd``): :func:`main`, then exit.

    An audit ends with hundreds of thousands of objects alive (flows, report
    rows, caches); letting the interpreter free them one by one at exit is
    work that serves nothing.  Once the report is written, an audit leaves by
    ``os._exit`` after flushing its output instead.  Other commands exit
    normally.
    """
    # egressd does no linear algebra: numpy's BLAS need not start a thread per
    # core when it is imported.  Those threads spin for a while at start-up,
    # on the CPU an audit's hashing thread needs, and sit idle in the daemon's
    # every process.  Set before numpy is first imported (the pipeline is
    # imported inside the commands); an explicit setting is kept.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    code = main()
    if sys.argv[1:2] != ["audit"]:
        sys.exit(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # e.g. stdout is a pipe whose reader has gone
        sys.exit(code)
    os._exit(code)


def _resolver(config: Config | None, geoip_db: str | None, asn_db: str | None,
              cache_size: int | None = None) -> CachedResolver:
    from egressd.geo import REGISTRY_NOTICE, open_resolver

    country = geoip_db or (config.geoip.country_db if config else None)
    asn = asn_db or (config.geoip.asn_db if config else None)
    size = cache_size or (config.geoip.cache_size if config else 65536)
    resolver = open_resolver(country, asn, cache_size=size)
    if country is None:
        _warn(REGISTRY_NOTICE)
    return resolver


def _timeouts(specs: list[str], grace: float) -> FlowTimeouts:
    from egressd.flows import FlowTimeouts

    default = FlowTimeouts()
    values = {"tcp": default.tcp, "udp": default.udp, "other": default.other}
    for spec in specs:
        proto, _, secs = spec.partition("=")
        if proto not in values:
            raise UsageError(f"--idle-timeout {spec!r}: expected tcp=, udp= or other=SECONDS")
        try:
            value = float(secs)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise UsageError(f"--idle-timeout {spec!r}: seconds must be a positive number")
        values[proto] = value
    if not grace >= 0:
        raise UsageError("--tcp-close-grace: seconds must not be negative")
    return FlowTimeouts(tcp=values["tcp"], udp=values["udp"], other=values["other"],
                        tcp_close_grace=grace)


def _jobs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of processes, 1 or more")
    return value


def _read_first_early(args: argparse.Namespace) -> tuple[list[str], HashingReader] | None:
    """Start reading and hashing the first capture now, if it is a regular file
    and one process will read it; with the capture files the arguments name.

    A best effort: whatever goes wrong here (no such file, a directory that
    holds none) is left to the normal path, which reports it in its place,
    after the policy has been checked.  Pipes and FIFOs are not opened early:
    opening a FIFO waits for its writer.
    """
    try:
        paths = expand_capture_args(args.captures)
        jobs = args.jobs if args.jobs is not None else default_jobs(paths)
        if not paths or jobs != 1 or paths[0] == "-":
            return None  # other processes are forked first, before any thread starts
        if not stat.S_ISREG(os.stat(paths[0]).st_mode):
            return None
        return paths, open_input(paths[0])
    except OSError:
        return None


def cmd_audit(args: argparse.Namespace) -> int:
    early = _read_first_early(args)
    try:
        return _audit(args, early)
    finally:
        if early is not None:
            early[1].close()


def _audit(args: argparse.Namespace, early: tuple[list[str], HashingReader] | None) -> int:
    from egressd.audit import Audit, AuditOptions, gc_paused
    from egressd.config import load_policy
    from egressd.netset import DEFAULT_INTERNAL_NETWORKS
    from egressd.parallel import ParallelAudit

    stored = None
    if args.verify:
        from egressd.verify import load_report
        stored = load_report(args.verify)
    # The audit reads the policy keys only: a daemon config file is accepted as
    # it is, and its daemon settings (capture, GeoIP paths, alerts) are ignored.
    policy = load_policy(args.policy)
    timeouts = _timeouts(args.idle_timeout, args.tcp_close_grace)
    if policy.internal_auto:
        policy = policy.resolve_auto(DEFAULT_INTERNAL_NETWORKS)
        _warn("internal_networks: 'auto' means the live gateway's own networks; an audit uses "
              "the default internal networks in its place")
    for w in policy.warnings:
        _warn(w)
    paths = early[0] if early is not None else expand_capture_args(args.captures)
    if not paths:
        raise UsageError("no capture files found in " + " ".join(args.captures))
    resolver = _resolver(None, args.geoip_db, args.asn_db)
    jobs = args.jobs if args.jobs is not None else default_jobs(paths)
    if jobs > 1 and "-" in paths:
        raise UsageError("--jobs: standard input can be read by one process only (use --jobs 1)")
    options = AuditOptions(timeouts=timeouts)
    # Other processes (if any) are forked first: before any thread starts.
    shares = ParallelAudit(policy, resolver, options, paths, jobs) if jobs > 1 else None
    audit = shares.audit if shares is not None else Audit(policy, resolver, options)
    show_progress = not args.no_progress and sys.stderr.isatty()
    try:
        with gc_paused():
            for i, path in enumerate(paths):
                with _progress(path, show_progress) as progress:
                    source = early[1] if early is not None and i == 0 else None
                    summary = audit.add_capture(path, progress=progress, source=source)
                if summary.truncated:
                    _warn(f"{path}: capture is damaged; read up to the damage: "
                          f"{summary.damage}")
            more = shares.collect() if shares is not None else []
            result = audit.finish(policy_path=args.policy, policy_sha256=policy.sha256 or "",
                                  more_flows=more)
            # What the audit built stays alive until the report is written.  Once
            # the collector runs again, its first collection would walk all of it
            # (every object made while it was paused is still in the youngest
            # generation); frozen, the collector leaves it alone until the report
            # is out.
            gc.freeze()
    finally:
        if shares is not None:
            shares.close()
    try:
        for w in result.warnings[len(policy.warnings):]:
            _warn(w)
        if stored is not None:
            from egressd.verify import verify
            return verify(result, stored, sys.stdout, report_path=args.verify)
        _write_report(result, args.format, args.output, policy=policy,
                      command=args.command_line)
        return _exit_status(result, args.fail_on)
    finally:
        gc.unfreeze()


def _exit_status(result: AuditResult, fail_on: str) -> int:
    from egressd.model import VerdictKind

    if fail_on == "never":
        return EXIT_OK
    levels = {VerdictKind.VIOLATION}
    if fail_on == "unknown":
        levels.add(VerdictKind.UNKNOWN)
    # Only exports are findings: a flow that sent nothing out (an unanswered
    # inbound probe) keeps its verdict in the report but fails no audit.
    found = any(f.verdict.verdict in levels and f.bytes_out > 0 for f in result.flows)
    return EXIT_FINDINGS if found else EXIT_OK


@contextlib.contextmanager
def _progress(path: str, enabled: bool) -> Iterator[Progress | None]:
    size = input_size(path)
    if not enabled or (size is not None and size < PROGRESS_MIN_BYTES):
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), transient=True,
                  console=None) as bar:
        task = bar.add_task(os.path.basename(path) or path, total=size)
        yield lambda n: bar.advance(task, n)


def _write_report(result: AuditResult, fmt: str, output: str | None, *,
                  policy: Policy | None = None, command: list[str] | None = None) -> None:
    policy_text = ""
    if fmt == "html":
        with open(result.policy_path, "rb") as f:
            policy_text = f.read().decode("utf-8", "replace")

    def render(out: IO[str]) -> None:
        if fmt == "json":
            from egressd.report import write_json
            write_json(result, out)
        elif fmt == "html":
            from egressd.report_html import write_html
            write_html(result, out, command=command or [], policy_text=policy_text,
                       policy=policy)
        elif fmt == "openmetrics":
            from egressd.report_openmetrics import write_openmetrics
            write_openmetrics(result, out)
        else:
            from egressd.report_text import write_text
            tty = output is None and sys.stdout.isatty()
            write_text(result, out, color=tty,
                       width=shutil.get_terminal_size().columns if tty else None,
                       command=command)

    if output is None or output == "-":
        render(sys.stdout)
        sys.stdout.flush()
        return
    if _is_special(output):
        # A device, FIFO or socket (/dev/null, /dev/stdout, a named pipe) is written
        # to as it is: renaming over it would replace the device node with a file.
        with open(output, "w", encoding="utf-8") as out:
            render(out)
        return
    # Write next to the target and rename, so a reader never sees half a report.
    import tempfile

    directory = os.path.dirname(os.path.abspath(output))
    fd, tmp = tempfile.mkstemp(prefix=".egressd-report-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            render(out)
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _is_special(path: str) -> bool:
    """True when ``path`` exists and is not a regular file or a directory."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def cmd_run(args: argparse.Namespace) -> int:
    import logging

    from egressd.daemon import Daemon

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    daemon = Daemon(args.config)
    daemon.install_signal_handlers()
    return daemon.run()


def cmd_check_config(args: argparse.Namespace) -> int:
    from egressd.config import load_config

    config = load_config(args.file)
    for w in config.policy.warnings:
        _warn(w)
    routes = len(config.policy.routes)
    print(f"{args.file}: ok ({routes} route{'s' if routes != 1 else ''})")
    return EXIT_OK


def cmd_lookup(args: argparse.Namespace) -> int:
    from egressd.classify import Classifier, addr16
    from egressd.config import load_config
    from egressd.model import PROTO_NUMBERS

    config = load_config(args.config) if args.config else None
    resolver = _resolver(config, args.geoip_db, args.asn_db)
    proto = PROTO_NUMBERS.get(args.proto.lower())
    if proto is None:
        try:
            proto = int(args.proto)
        except ValueError:
            raise UsageError(f"--proto: unknown protocol {args.proto!r}") from None
    internal = addr16(args.source) if args.source else None
    for ip in args.addresses:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise UsageError(f"{ip!r} is not an IP address") from None
        geo = resolver.lookup(ip)
        line = (f"{ip}\tcountry={geo.country or '-'}\tregistered={geo.registered_country or '-'}"
                f"\tasn={geo.asn if geo.asn is not None else '-'}\tas_org={geo.as_org or '-'}")
        if config is not None:
            policy = config.policy
            if policy.is_internal(addr16(ip)):
                line += "\tverdict=internal"
            else:
                clf = Classifier(policy, resolver)
                zone = policy.zone_of(internal) if internal else None
                v = clf.verdict(proto, internal, ip, args.port, _now_ns(), geo, zone)
                line += f"\tverdict={v.verdict.value}"
                if v.route:
                    line += f"\troute={v.route}"
                if v.approval:
                    line += f"\tapproval={v.approval}"
                if v.reason:
                    line += f"\treason={v.reason.value}"
        print(line)
    return EXIT_OK


def _now_ns() -> int:
    import time
    return time.time_ns()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
