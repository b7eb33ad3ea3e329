"""``python -m pipeline.table``: see ``pipeline.table.cli``."""

import sys

from pipeline.table.cli import main

sys.exit(main())
