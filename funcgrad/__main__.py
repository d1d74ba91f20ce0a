import sys

from funcgrad.cli import main

sys.exit(main())
