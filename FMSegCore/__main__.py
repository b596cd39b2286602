"""``python -m FMSegCore``: the ``fmseg`` command (how a local worker is started from any Python)."""

import sys

from FMSegCore.cli.main import main

sys.exit(main())
