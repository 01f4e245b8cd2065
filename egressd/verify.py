"""``egressd audit --verify REPORT.json``: re-run an audit and compare it with a stored report.

An ``egressd.audit/1`` report is reproducible: the same captures, policy and
GeoIP databases always give the same report, except ``generated_at``.  So an
auditor who holds the report and the inputs can check that the report is what
those inputs say, and a changed capture, policy or database shows up as the
JSON paths that differ (``captures[0].sha256``, ``policy.sha256``,
``geoip[0].build_epoch``, ``flows[12].bytes_out``, ...).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import IO, Any

from egressd.report import SCHEMA, AuditResult, write_json

IGNORED_TOP_LEVEL = frozenset({"generated_at"})
"""Top-level fields that change between runs by design."""

MAX_LINES = 20


class ReportError(ValueError):
    """The stored report cannot be read or is not an ``egressd.audit/1`` report."""


def load_report(path: str) -> dict[str, Any]:
    """Read and check a stored report; raises :class:`ReportError`."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ReportError(f"{path}: no such report file") from None
    except OSError as e:
        raise ReportError(f"{path}: cannot read the report: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: not a JSON report: {e}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else None
        raise ReportError(f"{path}: not an {SCHEMA} report (schema: {json.dumps(found)})")
    return data


def report_of(result: AuditResult) -> dict[str, Any]:
    """``result`` as the JSON report would hold it (written, then read back)."""
    buf = io.StringIO()
    write_json(result, buf)
    data: dict[str, Any] = json.loads(buf.getvalue())
    return data


def _path(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    simple = key.replace("_", "").replace("-", "").isalnum()
    name = key if simple else json.dumps(key, ensure_ascii=False)
    return f"{parent}.{name}" if parent else name


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


def differences(stored: Any, fresh: Any, path: str = "") -> Iterator[str]:
    """Each difference as ``json.path: report X, now Y`` (in document order)."""
    if isinstance(stored, dict) and isinstance(fresh, dict):
        for key in list(stored) + [k for k in fresh if k not in stored]:
            if not path and key in IGNORED_TOP_LEVEL:
                continue
            sub = _path(path, key)
            if key not in fresh:
                yield f"{sub}: in the report ({_show(stored[key])}), missing now"
            elif key not in stored:
                yield f"{sub}: missing from the report, now {_show(fresh[key])}"
            else:
                yield from differences(stored[key], fresh[key], sub)
        return
    if isinstance(stored, list) and isinstance(fresh, list):
        for i, (a, b) in enumerate(zip(stored, fresh, strict=False)):
            yield from differences(a, b, _path(path, i))
        if len(stored) != len(fresh):
            yield (f"{path or '(report)'}: {len(stored)} entries in the report, "
                   f"{len(fresh)} now")
        return
    # bool is an int in Python: compare types too, so 1 and true differ.
    if type(stored) is not type(fresh) or stored != fresh:
        yield f"{path or '(report)'}: report {_show(stored)}, now {_show(fresh)}"


def verify(result: AuditResult, stored: dict[str, Any], out: IO[str], *,
           report_path: str = "report", max_lines: int = MAX_LINES) -> int:
    """Compare a fresh audit with a stored report; print the outcome.

    Returns 0 when they match (ignoring ``generated_at``), 1 when they differ.
    At most ``max_lines`` differences are listed, then how many more there are.
    """
    diffs = list(differences(stored, report_of(result)))
    if not diffs:
        out.write(f"{report_path}: report matches\n")
        return 0
    n = len(diffs)
    out.write(f"{report_path}: report differs ({n} difference{'s' if n != 1 else ''}):\n")
    for line in diffs[:max_lines]:
        out.write(f"  {line}\n")
    if n > max_lines:
        out.write(f"  ... and {n - max_lines} more\n")
    return 1
