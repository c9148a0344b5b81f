"""The ComfyUI node pack's own tests (comfyui_xadapter/tests), run in ComfyUI's Python.

ComfyUI needs torch with torchvision, which cannot load beside this environment's torch
build, so its tests run in a separate environment: `.ci/run` builds it (torch 2.14.1 +
torchvision 0.29.1, ComfyUI's requirements, xa-runtime) and sets XA_COMFYUI_PYTHON to its
interpreter and XA_COMFYUI_DIR to the ComfyUI tree. Without them this test skips and
says how to set them up (docs/comfyui.md, "Running the tests").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACK_TESTS = REPO / "comfyui_xadapter" / "tests"


def _comfyui() -> tuple[str, str]:
    python = os.environ.get("XA_COMFYUI_PYTHON", "")
    tree = os.environ.get("XA_COMFYUI_DIR") or str(REPO.parent / "shared" / "comfyui")
    if not (Path(tree) / "comfy" / "samplers.py").is_file():
        pytest.skip(f"no ComfyUI tree at {tree}: set XA_COMFYUI_DIR (.ci/run does)")
    if not python or not Path(python).is_file():
        pytest.skip("XA_COMFYUI_PYTHON is not set to a Python with ComfyUI's requirements and xa-runtime "
                    "(.ci/run builds one; docs/comfyui.md says how)")
    return python, tree


def test_node_pack_in_comfyui(tmp_path):
    python, tree = _comfyui()
    report = tmp_path / "differences.jsonl"
    env = dict(os.environ, XA_COMFYUI_DIR=tree, XA_COMFYUI_REPORT=str(report), OMP_NUM_THREADS="2")
    cmd = [python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", str(REPO),
           str(PACK_TESTS)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    if report.is_file():  # the workflow-vs-pipeline differences, for the log
        for line in report.read_text().splitlines():
            print(json.loads(line))
    print(out[-3000:])
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-12000:]}"
    assert " passed" in out, out[-2000:]  # a skip (no chromium for the frontend test) says why above


PACK_MAY_IMPORT = {"xa_runtime", "xa_runtime.models.mapping", "xa_runtime.loading.adapter_checkpoint",
                   "xa_runtime.errors"}


def test_pack_imports_only_torch_level_xa_runtime():
    """The pack runs in ComfyUI's Python: it imports only these modules of xa_runtime (read
    off its source), and they must not pull in diffusers (a fresh interpreter here)."""
    import ast

    imported = set()
    for path in (REPO / "comfyui_xadapter").rglob("*.py"):
        if "tests" in path.relative_to(REPO / "comfyui_xadapter").parts:
            continue  # the pack's tests compare against the pipeline: they may import anything
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            imported |= {n for n in names if n.split(".")[0] == "xa_runtime"}
    assert imported and imported <= PACK_MAY_IMPORT, imported - PACK_MAY_IMPORT
    code = ("import sys; import xa_runtime.models.mapping, xa_runtime.loading.adapter_checkpoint, xa_runtime.errors; "
            "print('diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"
