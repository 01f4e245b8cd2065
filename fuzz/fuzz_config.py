"""Coverage-guided fuzzing of the configuration loaders (atheris).

One input is a whole file, read as a daemon configuration (``load_config``,
what ``egressd run`` and ``egressd check-config`` do) and as a policy
(``load_policy``, what ``egressd audit --policy`` does).  Everything must
either load or raise the one declared error, :class:`~egressd.config.ConfigError`,
whose text is one line naming the file; a file that loads as a
configuration must load as a policy too, with the same routes.

Without atheris the target runs under plain Python: it mutates the seed files
at random for a fixed number of inputs (``--plain N``), which finds less but
needs nothing installed.  See docs/fuzzing.md for how to run it.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

try:
    import atheris
except ImportError:  # plain-Python mode only
    atheris = None

if atheris is not None:
    with atheris.instrument_imports():
        import yaml  # noqa: F401  (instrumented: the loader's own parser)

        from egressd.config import ConfigError, load_config, load_policy
else:
    from egressd.config import ConfigError, load_config, load_policy

NOW = datetime(2026, 1, 1, tzinfo=UTC)
"""A fixed "now": which routes count as already expired must not change between runs."""
SEEDS = Path(__file__).resolve().parent / "seeds" / "config"

_dir = tempfile.mkdtemp(prefix="egressd-fuzz-config-")
atexit.register(shutil.rmtree, _dir, True)
PATH = os.path.join(_dir, "egressd.yaml")


def _checked(err: ConfigError) -> None:
    text = str(err)
    if "\n" in text or "\r" in text:
        raise AssertionError(f"ConfigError text is not one line: {text!r}")
    if not text.startswith(PATH):
        raise AssertionError(f"ConfigError does not name the file first: {text!r}")
    if err.line is not None and err.line < 1:
        raise AssertionError(f"ConfigError line {err.line} is not 1-based: {text!r}")


def check(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    try:
        config = load_config(PATH, now=NOW)
    except ConfigError as err:
        _checked(err)
        config = None
    try:
        policy = load_policy(PATH, now=NOW)
    except ConfigError as err:
        _checked(err)
        if config is not None:
            raise AssertionError(f"loads as a configuration but not as a policy: {err}") from None
        return
    if config is not None and config.policy.routes != policy.routes:
        raise AssertionError("the configuration and the policy have different routes")


def plain(runs: int, seed: int) -> None:
    """Random byte- and line-level mutations of the seeds, ``runs`` inputs in all."""
    rng = random.Random(seed)
    seeds = [p.read_bytes() for p in sorted(SEEDS.iterdir()) if p.is_file()]
    tokens = [b"*a", b"&a ", b"!!python/object ", b"- ", b": ", b"{", b"}", b"[", b"]",
              b"'", b'"', b"\t", b"\n  ", b"\xff", b"\x00", b"::", b"/33", b"2099-02-30",
              b"<<: *a", b"? ", b"0x10", b"1e400", b"-1", b"~", b"null", b"yes"]
    for i in range(runs):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            op = rng.randrange(5)
            pos = rng.randint(0, len(data))
            if op == 0 and data:
                del data[pos:pos + rng.randint(1, 16)]
            elif op == 1:
                data[pos:pos] = rng.choice(tokens)
            elif op == 2 and data:
                data[min(pos, len(data) - 1)] = rng.randrange(256)
            elif op == 3:
                other = rng.choice(seeds)
                start = rng.randint(0, len(other))
                data[pos:pos] = other[start:start + rng.randint(1, 200)]
            else:
                lines = bytes(data).split(b"\n")
                rng.shuffle(lines)
                data = bytearray(b"\n".join(lines))
        try:
            check(bytes(data))
        except Exception:
            crash = Path(f"crash-plain-{seed}-{i}")
            crash.write_bytes(bytes(data))
            print(f"crash on input {i}, written to {crash}", file=sys.stderr)
            raise
    print(f"{runs} inputs checked (seed {seed})")


def main() -> None:
    if atheris is None or "--plain" in sys.argv:
        args = sys.argv[1:]
        runs = int(args[args.index("--plain") + 1]) if "--plain" in args else 10_000
        seed = int(args[args.index("--seed") + 1]) if "--seed" in args else 1
        plain(runs, seed)
        return
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
