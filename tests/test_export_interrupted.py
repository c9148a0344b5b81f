"""An interrupted or forced export: staging folders of a killed xa-export are removed by the
next run (those of a running one are kept), and a --force re-export keeps the old export
valid (its manifest verifies) until the new graphs are complete."""

from __future__ import annotations

import subprocess
import sys

import pytest

from xa_runtime.export import manifest as mf
from xa_runtime.export import onnx_export
from xa_runtime.export.wrappers import ModuleBundle

GRAPH = "mapping"  # the smallest graph of the tiny models


@pytest.fixture(scope="module")
def bundles():
    return ModuleBundle.tiny(0), ModuleBundle.tiny(1)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_staging_of_a_dead_export_is_removed_and_a_live_ones_kept(bundles, tmp_path):
    pid = dead_pid()
    stale = [tmp_path / f".sd15_unet-{onnx_export.STAGING_TAG}{pid}-abcd1234",
             tmp_path / f".{onnx_export.STAGING_TAG}{pid}-efgh5678"]
    live = tmp_path / f".sd15_unet-{onnx_export.STAGING_TAG}{subprocess.os.getppid()}-ijkl9012"
    for folder in (*stale, live):
        folder.mkdir()
        (folder / "raw.onnx").write_bytes(b"x" * 100)
    with pytest.warns(UserWarning, match="interrupted export"):
        onnx_export.export_graphs([GRAPH], bundles[0], tmp_path, progress=False)
    assert not any(f.exists() for f in stale)
    assert live.is_dir()
    mf.verify_graphs(tmp_path, [GRAPH])
    # nothing of this run is left hidden either
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [live.name]


def test_a_killed_export_leaves_staging_that_the_next_run_removes(tmp_path):
    out = tmp_path / "out"
    code = ("import os, signal, sys\n"
            "from xa_runtime.export import onnx_export\n"
            "from xa_runtime.export.wrappers import ModuleBundle\n"
            "real = onnx_export._write_checked\n"
            "def die(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "onnx_export._write_checked = die\n"
            f"onnx_export.export_graphs(['{GRAPH}'], ModuleBundle.tiny(0), sys.argv[1], progress=False)\n")
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, timeout=300)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    left = [p for p in out.iterdir() if p.name.startswith(".")]
    assert left, "the killed export should have left its staging folder"
    with pytest.warns(UserWarning, match="interrupted export"):
        onnx_export.export_graphs([GRAPH], ModuleBundle.tiny(0), out, progress=False)
    assert [p for p in out.iterdir() if p.name.startswith(".")] == []
    mf.verify_graphs(out, [GRAPH])


def test_force_reexport_keeps_the_old_export_valid_until_the_new_one_is_complete(bundles, tmp_path, monkeypatch):
    old, new = bundles
    onnx_export.export_graphs([GRAPH], old, tmp_path, progress=False)
    old_manifest = mf.read_manifest(tmp_path)
    real_export_graph, seen = onnx_export.export_graph, []

    def checked_export_graph(name, bundle, path, *args, **kwargs):
        mf.verify_graphs(tmp_path, [GRAPH])  # the old export, still whole, before ...
        result = real_export_graph(name, bundle, path, *args, **kwargs)
        mf.verify_graphs(tmp_path, [GRAPH])  # ... and after a new graph was written
        assert mf.read_manifest(tmp_path) == old_manifest
        seen.append(name)
        return result

    monkeypatch.setattr(onnx_export, "export_graph", checked_export_graph)
    onnx_export.export_graphs([GRAPH], new, tmp_path, progress=False, force=True)
    assert seen == [GRAPH]
    new_manifest = mf.read_manifest(tmp_path)
    assert new_manifest["source"] != old_manifest["source"]
    mf.verify_graphs(tmp_path, [GRAPH])
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []
