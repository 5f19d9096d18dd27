"""``python -m resnext_flax.cli``."""

import sys

from resnext_flax.cli import main

if __name__ == "__main__":
    sys.exit(main())
