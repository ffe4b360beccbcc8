"""`python -m oppass`: the same command line as `oppass`."""

import sys

from oppass.cli import main

sys.exit(main())
