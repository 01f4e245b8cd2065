"""Coverage-guided fuzzing of the capture readers and the decoders (atheris).

One input is a whole capture file.  Everything must either work or raise the
one declared error (:class:`~egressd.sources.base.CaptureError`, for input
that is no capture at all); the vectorized and the scalar decoder must agree
on every packet; and every decoded packet must make a flow key the later
stages accept.  See docs/fuzzing.md for how to run it.
"""

from __future__ import annotations

import io
import sys

import atheris

with atheris.instrument_imports():
    import numpy as np

    from egressd.decode.batch import Decoded, decode_batch, decode_scalar_batch
    from egressd.flows import FlowTable
    from egressd.sources.base import CaptureError
    from egressd.sources.files import open_capture


def check(data: bytes) -> None:
    try:
        reader = open_capture(io.BytesIO(data), batch_records=64)
    except CaptureError:
        return
    table = FlowTable()
    for batch in reader.batches():
        fast = decode_batch(batch)
        slow = decode_scalar_batch(batch)
        for name in Decoded.__slots__:
            if not np.array_equal(getattr(fast, name), getattr(slow, name)):
                raise AssertionError(f"decoders disagree on column {name}")
        table.process(fast)
    table.flush()
    info = reader.info
    assert info.packets >= 0 and (info.damage is None) == (not info.truncated)


def main() -> None:
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
