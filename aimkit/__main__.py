"""``python -m aimkit ...``: the same command line as the ``aimkit`` script."""

import sys

from .cli import main

sys.exit(main())
