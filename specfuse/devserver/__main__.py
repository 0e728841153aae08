"""`python -m specfuse.devserver MODEL --protocol tgi|vllm|sglang` (the same as `specfuse serve`)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from specfuse.devserver.server import main

raise SystemExit(main())
