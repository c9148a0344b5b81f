"""Session fixtures: the tiny random models, in memory and saved in every on-disk format."""

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU interpreter here. Set before anything imports triton
    # (diffusers may), since triton.jit picks interpreter mode at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Random tiny weights leave denormal floats in some activations, which make CPU math
    # intermittently 10-50x slower; flushing them keeps the suite's time steady.
    torch.set_flush_denormal(True)

import pytest  # noqa: E402

from xa_runtime.models.tiny import build_tiny_models  # noqa: E402
from xa_runtime.testing import save_tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models():
    """(SD15Components, SDXLComponents, MappingLayers) of build_tiny_models(0)."""
    return build_tiny_models(0)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    """TinyModelPaths of save_tiny_models(seed 0): diffusers folders, single files, VAE, adapter."""
    return save_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory):
    """(ModuleBundle.tiny(0), folder): every graph of the table exported once, fp32, opset 17."""
    from xa_runtime.export import ModuleBundle, export_graphs
    from xa_runtime.graphs import GRAPHS

    bundle = ModuleBundle.tiny(0)
    folder = tmp_path_factory.mktemp("onnx")
    export_graphs(list(GRAPHS), bundle, folder, progress=False)
    return bundle, folder
