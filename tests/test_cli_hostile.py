"""Hostile input to the command-line tools: malformed and hostile files, odd paths and
values. Each is refused with exit status 2 and one `error:` line naming the flag (a
traceback only with --debug), before the models load wherever the check needs no model,
and leaves no file behind. The hostile files are built here, in tmp_path."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from xa_runtime.cli import bench as bench_cli
from xa_runtime.cli import export as export_cli
from xa_runtime.cli import generate as generate_cli

ROOT = Path(__file__).resolve().parents[1]


# ---- hostile files -------------------------------------------------------------------------

def safetensors_with_header(path: Path, header: object) -> Path:
    """A .safetensors file whose JSON header is `header` (any JSON), followed by no data."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


class _RunsCode:
    """A pickle payload that would run `os.system` when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_pickle(path: Path, marker: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"conv_in.weight": _RunsCode(marker)}, f)
    return path


def png(path: Path, size=(32, 32)) -> Path:
    Image.new("RGB", size, (120, 30, 200)).save(path)
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(path: Path, side: int = 12000) -> Path:
    """A small PNG declaring side x side pixels (144 Mpx for 12000): one IDAT of compressed zeros."""
    row = b"\x00" * (1 + side)  # filter byte + grey pixels
    data = zlib.compress(row * side, 9)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    return path


def png_corrupt_zlib(path: Path, side: int = 32) -> Path:
    """A PNG whose chunks all have valid CRCs but whose IDAT is not a zlib stream."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"\x78\x9c" + b"\xff" * 64)
                     + _chunk(b"IEND", b""))
    return path


def lora_file(path: Path, tiny_models, *, down=None, up=None, alpha=None) -> Path:
    """A kohya LoRA for one layer of the tiny SD1.5 UNet (attn1.to_q of the first transformer)."""
    unet = tiny_models[0].unet
    q = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    out_f, in_f = q.weight.shape
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    state = {f"{stem}.lora_down.weight": torch.randn(4, in_f) * 0.01 if down is None else down(in_f),
             f"{stem}.lora_up.weight": torch.randn(out_f, 4) * 0.01 if up is None else up(out_f)}
    if alpha is not None:
        state[f"{stem}.alpha"] = alpha
    save_file(state, path)
    return path


# ---- running the tools -----------------------------------------------------------------------

@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading a pipeline fails the test: the check must come first."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(generate_cli, "load_pipeline", refuse)
    monkeypatch.setattr(export_cli, "load_bundle", refuse)
    monkeypatch.setattr(bench_cli, "_build", refuse)


def refused(main, argv, capsys, *names: str) -> str:
    """Run `main(argv)`; it must exit 2 with one `error:` line naming each of `names`."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def gen_args(tmp_path: Path, *extra) -> list:
    return ["--prompt", "a cat", "--steps", "2", "--output", tmp_path / "out.png", "--no-progress", *extra]


def models(tiny_paths, **override) -> list:
    paths = {"--sd15": tiny_paths.sd15_dir, "--sdxl": tiny_paths.sdxl_dir, "--adapter": tiny_paths.adapter_bin}
    paths.update(override)
    return [x for flag, value in paths.items() for x in (flag, value)]


def left_behind(folder: Path, before: set[str]) -> set[str]:
    return {p.name for p in folder.iterdir()} - before


# ---- malformed model files ---------------------------------------------------------------------

@pytest.mark.parametrize("header", [{"w": 1}, {"w": {"dtype": "F32", "data_offsets": [0, 0]}},
                                    {"w": {"dtype": "F32", "shape": "big", "data_offsets": [0, 0]}}],
                         ids=["value-not-a-table", "no-shape", "shape-not-a-list"])
def test_malformed_safetensors_header_is_refused_naming_the_flag(header, tiny_paths, tmp_path, capsys,
                                                                 no_model_loading):
    bad = safetensors_with_header(tmp_path / "sd15.safetensors", header)
    line = refused(generate_cli.main, gen_args(tmp_path, *models(tiny_paths, **{"--sd15": bad})), capsys, "--sd15",
                   str(bad))
    assert "header" in line
    assert not (tmp_path / "out.png").exists()


def test_adapter_with_non_string_keys_is_refused(tiny_paths, tmp_path, capsys, no_model_loading):
    bad = tmp_path / "adapter.bin"
    torch.save({1: torch.zeros(1), "body.0.block1.weight": torch.zeros(1)}, bad)
    line = refused(generate_cli.main, gen_args(tmp_path, *models(tiny_paths, **{"--adapter": bad})), capsys,
                   "--adapter", str(bad))
    assert "keys" in line


def test_unet_config_that_is_a_list_is_refused(tiny_paths, tmp_path, capsys, no_model_loading):
    import shutil

    folder = tmp_path / "sd15"
    shutil.copytree(tiny_paths.sd15_dir, folder)
    (folder / "unet" / "config.json").write_text("[1, 2]")
    line = refused(generate_cli.main, gen_args(tmp_path, *models(tiny_paths, **{"--sd15": folder})), capsys, "--sd15")
    assert "config.json" in line


def test_unet_weights_of_another_architecture_are_refused_after_loading(tiny_paths, tmp_path, capsys):
    import shutil

    folder = tmp_path / "sd15"
    shutil.copytree(tiny_paths.sd15_dir, folder)
    weights = next((folder / "unet").glob("diffusion_pytorch_model.*"))
    sdxl_weights = next((tiny_paths.sdxl_dir / "unet").glob("diffusion_pytorch_model.*"))
    shutil.copy(sdxl_weights, weights.with_suffix(sdxl_weights.suffix))
    refused(generate_cli.main, gen_args(tmp_path, *models(tiny_paths, **{"--sd15": folder})), capsys, "--sd15")
    assert not (tmp_path / "out.png").exists()


def test_hostile_pickle_in_a_diffusers_folder_is_refused_and_never_runs(tiny_paths, tmp_path, capsys):
    import shutil

    folder = tmp_path / "sd15"
    shutil.copytree(tiny_paths.sd15_dir, folder)
    for f in (folder / "unet").glob("diffusion_pytorch_model.*"):
        f.unlink()
    marker = tmp_path / "pwned"
    bad = hostile_pickle(folder / "unet" / "diffusion_pytorch_model.bin", marker)
    line = refused(generate_cli.main, gen_args(tmp_path, *models(tiny_paths, **{"--sd15": folder})), capsys, "--sd15",
                   str(bad))
    assert "weights_only" in line
    assert not marker.exists()


def test_fifo_checkpoint_is_refused_at_once(tiny_paths, tmp_path):
    fifo = tmp_path / "sd15.safetensors"
    os.mkfifo(fifo)
    cmd = [sys.executable, "-c", "import sys; from xa_runtime.cli.generate import main; sys.exit(main())",
           *map(str, gen_args(tmp_path, *models(tiny_paths, **{"--sd15": fifo})))]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert "--sd15" in done.stderr and "not a regular file" in done.stderr


def test_adapter_link_to_a_device_is_not_called_a_folder(tiny_paths, tmp_path, capsys, no_model_loading):
    link = tmp_path / "adapter.bin"
    link.symlink_to("/dev/null")
    line = refused(generate_cli.main, gen_args(tmp_path, *models(tiny_paths, **{"--adapter": link})), capsys,
                   "--adapter")
    assert "folder" not in line and "not a regular file" in line


# ---- LoRA files --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["rank-mismatch", "vector-alpha", "nan", "huge"])
def test_bad_lora_is_refused_when_it_loads(kind, tiny_models, tmp_path, capsys, no_model_loading):
    kwargs = {
        "rank-mismatch": dict(up=lambda o: torch.randn(o, 3) * 0.01),
        "vector-alpha": dict(alpha=torch.ones(4)),
        "nan": dict(up=lambda o: torch.full((o, 4), float("nan"))),
        "huge": dict(up=lambda o: torch.full((o, 4), 1e30)),
    }[kind]
    bad = lora_file(tmp_path / f"{kind}.safetensors", tiny_models, **kwargs)
    refused(generate_cli.main, gen_args(tmp_path, "--lora", bad), capsys, "--lora", str(bad))


# ---- images ------------------------------------------------------------------------------------

def test_decompression_bomb_init_image_is_refused(tmp_path, capsys, no_model_loading):
    bomb = png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 1_000_000
    line = refused(generate_cli.main, gen_args(tmp_path, "--init-image", bomb, "--strength", "0.5"), capsys,
                   "--init-image", "pixels")
    assert "144000000" in line or "12000x12000" in line


@pytest.mark.parametrize("flag", ["--init-image", "--control-image"])
def test_corrupt_zlib_image_is_refused_before_loading(flag, tiny_paths, tmp_path, capsys, no_model_loading):
    bad = png_corrupt_zlib(tmp_path / "bad.png")
    extra = ["--init-image", bad] if flag == "--init-image" else ["--controlnet", tiny_paths.root, "--control-image", bad]
    if flag == "--control-image":
        from xa_runtime.testing.plugins import write_tiny_controlnet
        from xa_runtime.testing.models import build_tiny_models

        folder, _ = write_tiny_controlnet(tmp_path / "cn", build_tiny_models(0)[0].unet)
        extra[1] = folder
    refused(generate_cli.main, gen_args(tmp_path, *extra), capsys, flag, str(bad))


# ---- flags -------------------------------------------------------------------------------------

def test_ip_scale_without_ip_adapter_is_refused(tmp_path, capsys, no_model_loading):
    refused(generate_cli.main, gen_args(tmp_path, "--ip-scale", "0.5"), capsys, "--ip-scale", "--ip-adapter")


def test_hostile_ip_adapter_blames_ip_adapter_not_image_encoder(tmp_path, capsys, no_model_loading):
    marker = tmp_path / "pwned"
    bad = hostile_pickle(tmp_path / "ip-adapter_sd15.bin", marker)
    line = refused(generate_cli.main, gen_args(tmp_path, "--ip-adapter", bad, "--ip-image", png(tmp_path / "i.png")),
                   capsys, "--ip-adapter")
    assert "--image-encoder" not in line.split(":")[1] and "None" not in line
    assert not marker.exists()


def test_prompt_that_is_not_utf8_is_refused(tmp_path, capsys, no_model_loading):
    prompt = b"a \xff cat".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes
    refused(generate_cli.main, ["--prompt", prompt, "--output", tmp_path / "out.png"], capsys, "--prompt", "UTF-8")


@pytest.mark.parametrize("sidecar", ["json", "second-image"])
def test_output_whose_sidecar_is_a_folder_is_refused_before_any_work(sidecar, tmp_path, capsys, no_model_loading):
    (tmp_path / ("out.json" if sidecar == "json" else "out-1.png")).mkdir()
    before = {p.name for p in tmp_path.iterdir()}
    refused(generate_cli.main, gen_args(tmp_path, "--batch", "2"), capsys, "--output")
    assert left_behind(tmp_path, before) == set()


def test_a_failing_write_leaves_nothing_behind(tmp_path, monkeypatch):
    from xa_runtime import atomic_files
    from xa_runtime.cli import output_files

    targets = {tmp_path / "a.png": b"a", tmp_path / "b.png": b"b", tmp_path / "a.json": b"{}"}
    real_replace, calls = os.replace, []

    def replace_then_fail(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(atomic_files.os, "replace", replace_then_fail)
    with pytest.raises(OSError):
        output_files.write_all_or_nothing(targets)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_debug_prints_the_traceback(tmp_path, capsys, no_model_loading):
    code = generate_cli.main([str(a) for a in gen_args(tmp_path, "--ip-scale", "0.5", "--debug")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and "error:" in err


# ---- xa-export ---------------------------------------------------------------------------------

def test_export_negative_tiny_seed_is_refused(tmp_path, capsys, no_model_loading):
    refused(export_cli.main, ["--tiny", "--tiny-seed", "-3", "--output", tmp_path / "x"], capsys, "--tiny-seed", "-3")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_export_read_only_output_is_refused_before_loading(tmp_path, capsys, no_model_loading):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    refused(export_cli.main, ["--tiny", "--output", out], capsys, "--output", "writable")


def test_export_read_only_output_is_refused_before_loading_even_as_root(tmp_path, capsys, no_model_loading,
                                                                          monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == out and mode & os.W_OK
                        else real_access(p, mode, **k))
    refused(export_cli.main, ["--tiny", "--output", out], capsys, "--output", "writable")


# ---- xa-bench ----------------------------------------------------------------------------------

def test_bench_refused_model_path_is_one_line(tiny_paths, tmp_path, capsys, no_model_loading):
    bad = safetensors_with_header(tmp_path / "sd15.safetensors", {"w": 1})
    refused(bench_cli.main, ["--models", "paths", "--sd15", bad, "--sdxl", tiny_paths.sdxl_dir,
                             "--adapter", tiny_paths.adapter_bin], capsys, "--sd15")


def test_bench_output_that_is_a_folder_is_refused_before_the_run(tmp_path, capsys, no_model_loading):
    (tmp_path / "r.json").mkdir()
    refused(bench_cli.main, ["--output", tmp_path / "r.json"], capsys, "--output")


def test_bench_output_whose_sidecar_is_a_folder_is_refused_before_the_run(tmp_path, capsys, no_model_loading):
    (tmp_path / "r.md").mkdir()
    refused(bench_cli.main, ["--output", tmp_path / "r.json"], capsys, "--output")


def test_bench_read_only_output_is_refused_before_the_run(tmp_path, capsys, no_model_loading, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == tmp_path and mode & os.W_OK
                        else real_access(p, mode, **k))
    refused(bench_cli.main, ["--output", tmp_path / "r.json"], capsys, "--output", "writable")


# ---- xa-build-engines ----------------------------------------------------------------------------

def test_build_engines_read_only_output_is_refused_first(tmp_path, capsys, monkeypatch):
    from xa_runtime.cli import build_engines

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == tmp_path and mode & os.W_OK
                        else real_access(p, mode, **k))
    refused(build_engines.main, ["--tiny", "--onnx-dir", tmp_path / "onnx", "--output", tmp_path / "engines"], capsys,
            "--output", "writable")


# Limits: what cannot run is refused before it runs, naming the flag and the range.

@pytest.mark.parametrize("tool", ["generate", "export", "bench"])
def test_a_tiny_seed_past_int64_is_refused_with_its_range(tool, tmp_path, capsys, no_model_loading):
    main, argv = {"generate": (generate_cli.main, gen_args(tmp_path)),
                  "export": (export_cli.main, ["--output", tmp_path / "onnx"]),
                  "bench": (bench_cli.main, [])}[tool]
    line = refused(main, [*argv, "--tiny-seed", str(2**64)], capsys, "--tiny-seed")
    assert "0..9223372036854775807" in line


@pytest.mark.parametrize("tool", ["generate", "bench"])
def test_a_billion_threads_is_refused_with_its_range(tool, tmp_path, capsys, no_model_loading):
    main, argv = {"generate": (generate_cli.main, gen_args(tmp_path)), "bench": (bench_cli.main, [])}[tool]
    line = refused(main, [*argv, "--threads", str(10**9)], capsys, "--threads")
    assert "1..1024" in line


def test_the_largest_sizes_with_the_largest_batch_are_refused_before_loading(tmp_path, capsys, no_model_loading,
                                                                             monkeypatch):
    monkeypatch.setattr("xa_runtime.runtime.memory.device_memory_bytes", lambda device: 64 * 2**30)  # a 64 GiB machine
    line = refused(generate_cli.main, gen_args(tmp_path, "--batch", "64", "--height", "4096", "--width", "4096",
                                               "--height-sd15", "2048", "--width-sd15", "2048"), capsys, "--batch")
    assert "GiB" in line and "--height 4096" in line
    assert list(tmp_path.iterdir()) == []
