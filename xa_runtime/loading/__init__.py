"""Everything read from disk, offline only: SD1.5/SDXL diffusers folders and single-file
checkpoints (configs bundled from the presets), replacement VAEs, the X-Adapter mapping
checkpoint. Pickles are only ever read with `torch.load(weights_only=True)`.
"""

from .adapter_checkpoint import load_mapping
from .base_models import load_sd15, load_sdxl
from .family import check_model_path, detect_family
from .single_file import single_file_config_folder
from .vae import load_vae

__all__ = [
    "check_model_path",
    "detect_family",
    "load_mapping",
    "load_sd15",
    "load_sdxl",
    "load_vae",
    "single_file_config_folder",
]
