"""``python -m funcgrad``: the command line (see :mod:`funcgrad.cli`)."""

import sys

from funcgrad.cli import main

if __name__ == "__main__":
    sys.exit(main())
