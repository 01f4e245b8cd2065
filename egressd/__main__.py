"""``python -m egressd``: the same as the ``egressd`` command."""

import sys

from egressd.cli import main

sys.exit(main())
