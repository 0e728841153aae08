"""``python -m specfuse.models``: the command ``scripts/setup.sh`` runs to install the models."""

import os
import sys

# Importing specfuse.models (done before this file runs) loads neither
# huggingface_hub nor transformers, so this still reaches them: a conversion
# must never reach for a hub, whatever the caller's environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from specfuse.models.commands import main

sys.exit(main())
