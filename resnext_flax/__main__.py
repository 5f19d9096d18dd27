"""``python -m resnext_flax``: the ``resnext-flax`` command."""

import sys

from resnext_flax.cli import main

if __name__ == "__main__":
    sys.exit(main())
