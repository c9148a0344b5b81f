"""Everything read from disk, offline only: SD1.5/SDXL diffusers folders and single-file
checkpoints (configs bundled from the presets), replacement VAEs, the X-Adapter mapping
checkpoint. Pickles are only ever read with `torch.load(weights_only=True)`.

The names load on first use, so that `xa_runtime.loading.adapter_checkpoint` (torch and
safetensors only) is importable without diffusers, as the ComfyUI node pack needs.
"""

from __future__ import annotations

import lazy_loader

__getattr__, __dir__, _ = lazy_loader.attach(__name__, submod_attrs={
    "adapter_checkpoint": ["load_mapping"],
    "base_models": ["load_sd15", "load_sdxl"],
    "family": ["check_model_path", "detect_family"],
    "single_file": ["single_file_config_folder"],
    "vae": ["load_vae"],
})

__all__ = [
    "check_model_path",
    "detect_family",
    "load_mapping",
    "load_sd15",
    "load_sdxl",
    "load_vae",
    "single_file_config_folder",
]
