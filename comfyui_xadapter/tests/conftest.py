"""The node pack's tests run in ComfyUI's Python (torch with torchvision, ComfyUI's
requirements, xa-runtime installed): tests/test_comfyui_pack.py starts them there.

ComfyUI is found at $XA_COMFYUI_DIR, else ../shared/comfyui beside the repository; it is
imported from that tree (never written to) with its command-line parsing off and the CPU
selected, as `main.py --cpu` would.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def comfyui_dir() -> Path | None:
    candidates = [os.environ.get("XA_COMFYUI_DIR"), REPO.parent / "shared" / "comfyui"]
    for c in candidates:
        if c and (Path(c) / "comfy" / "samplers.py").is_file():
            return Path(c).resolve()
    return None


COMFYUI = comfyui_dir()
if COMFYUI is None:
    collect_ignore_glob = ["test_*.py"]
else:
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.path.insert(0, str(COMFYUI))
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = True


def pytest_report_header(config):
    return f"ComfyUI: {COMFYUI or 'not found (set XA_COMFYUI_DIR)'}"


@pytest.fixture(autouse=True)
def _seeded():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
