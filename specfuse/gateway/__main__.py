"""python -m specfuse.gateway ensemble.toml --port 8000 (the same as `specfuse gateway`)."""

import sys

from specfuse.gateway.command import main

sys.exit(main())
