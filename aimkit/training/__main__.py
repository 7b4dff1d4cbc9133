"""``python -m aimkit.training ...`` (what ``accelerate launch -m aimkit.training`` runs): ``aimkit train``."""

import sys

from .cli import main

sys.exit(main())
