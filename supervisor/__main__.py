"""`python -m supervisor` is `vram-llm`."""

import sys

from supervisor.cli import main

sys.exit(main())
