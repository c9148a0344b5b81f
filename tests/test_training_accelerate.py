"""The `train` extra installs accelerate, and with accelerate installed diffusers loads
models another way (low_cpu_mem_usage: empty weights, then assignment). Inference must not
notice: the tiny models loaded from every on-disk format and run through the pipeline
give the same weights and the same image, bit for bit, with accelerate importable and with
it hidden (an import blocker on sys.meta_path, in a fresh interpreter each)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

RUN = r"""
import hashlib, json, sys
mode, sd15, sdxl, adapter = sys.argv[1:5]
if mode == "hidden":
    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name == "accelerate" or name.startswith("accelerate."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
            return None
    sys.meta_path.insert(0, Blocker())
    sys.modules["accelerate"] = None
import torch
torch.set_flush_denormal(True)
import diffusers.utils.import_utils as iu
from xa_runtime import XAdapterPipeline
pipe = XAdapterPipeline.from_pretrained(sd15, sdxl, adapter, progress=False)
out = pipe("a red square", num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt")
digest = hashlib.sha256()
for module in (pipe.sd15.unet, pipe.sd15.vae, pipe.sd15.text_encoder, pipe.sdxl.unet, pipe.sdxl.vae,
               pipe.sdxl.text_encoder, pipe.sdxl.text_encoder_2, pipe.mapping):
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode()); digest.update(value.contiguous().numpy().tobytes())
print(json.dumps({"accelerate": iu.is_accelerate_available(), "weights": digest.hexdigest(),
                  "image": hashlib.sha256(out.images.contiguous().numpy().tobytes()).hexdigest()}))
"""


def run(mode: str, sd15: Path, sdxl: Path, adapter: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", RUN, mode, str(sd15), str(sdxl), str(adapter)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layout", ["diffusers", pytest.param("single_file", marks=pytest.mark.slow)])
def test_inference_is_bit_identical_with_and_without_accelerate(tiny_paths, layout):
    pytest.importorskip("accelerate", reason="the [train] / [test] extras install it")
    if layout == "diffusers":
        paths = (tiny_paths.sd15_dir, tiny_paths.sdxl_dir, tiny_paths.adapter_safetensors)
    else:
        paths = (tiny_paths.sd15_file, tiny_paths.sdxl_file, tiny_paths.adapter_bin)
    with_it, without = run("installed", *paths), run("hidden", *paths)
    assert with_it["accelerate"] is True and without["accelerate"] is False
    assert with_it["weights"] == without["weights"]
    assert with_it["image"] == without["image"]
