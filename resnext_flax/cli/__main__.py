"""``python -m resnext_flax.cli``."""

import sys

from resnext_flax.cli import main

sys.exit(main())
