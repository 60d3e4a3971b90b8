"""Entry point: `python -m bench [--smoke] [--longer] ...` (`make bench ARGS=...`)."""

import sys

from bench.cli import main

sys.exit(main())
