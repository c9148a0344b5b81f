"""xa-runtime's ComfyUI node pack: X-Adapter on ComfyUI's own SD1.5 and SDXL models.

Link or copy this folder into ComfyUI's `custom_nodes/` and install xa-runtime into
ComfyUI's Python (`pip install -e <this repository>`). The SD1.5 and SDXL models are
ComfyUI MODELs, so ComfyUI's LoRA loaders, ControlNet, IP-Adapter nodes, samplers and
schedulers act on the SD1.5 side and X-Adapter carries them to SDXL. Tested with ComfyUI
0.3.64 (docs/comfyui.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import xa_runtime  # noqa: F401
except ImportError:  # linked from a checkout without installing it: use that checkout
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_model_folder

register_model_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
