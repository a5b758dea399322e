"""``python -m t2tune`` (what ``accelerate launch -m t2tune train ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
