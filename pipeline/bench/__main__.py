"""``python -m pipeline.bench``: see ``pipeline.bench.cli``."""

import sys

from pipeline.bench.cli import main

sys.exit(main())
