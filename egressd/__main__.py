"""``python -m egressd``: the same as the ``egressd`` command."""

from egressd.cli import run

run()
