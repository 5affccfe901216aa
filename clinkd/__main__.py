"""``python -m clinkd`` = the ``clinkd`` command."""

import sys

from clinkd.cli import main

sys.exit(main())
