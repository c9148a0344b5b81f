"""xa-runtime: an inference runtime for X-Adapter (arXiv 2312.02238).

SD1.5 plugins act on SDXL through a frozen SD1.5 branch whose decoder features are
remapped into the SDXL decoder. Importing this package switches the Hugging Face hub
clients to offline mode: weights and configs only ever come from local paths.
"""

import os

# Set before diffusers / transformers / huggingface_hub are imported anywhere in the
# process, so that no code path can reach a hub at run time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

__version__ = "0.1.0"
