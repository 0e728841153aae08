"""`python -m specfuse` is the `specfuse` command."""

import sys

from specfuse.cli import main

sys.exit(main())
