"""``python -m benchmarks.ifeval``: the command line of :mod:`benchmarks.ifeval.run`."""

import sys

from benchmarks.ifeval.run import main

sys.exit(main())
