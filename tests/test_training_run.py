"""xa-train end to end on the tiny models (CPU, accelerate, one process unless marked):
frozen weights untouched, a run stopped by SIGTERM and resumed equals an uninterrupted one
bit for bit, the adapter is in the released key layout and changes xa-generate's image,
two processes (accelerate launch, gloo) train like one with the same global batch, and
bad input stops before any step with the flag named."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from xa_runtime.cli import generate
from xa_runtime.cli import train as train_cli
from xa_runtime.loading import load_mapping
from xa_runtime.models.mapping import MappingConfig
from xa_runtime.models.tiny import build_tiny_models
from xa_runtime.testing.training_data import write_imagefolder, write_webdataset
from xa_runtime.training import TrainModels, TrainOptions, train
from xa_runtime.training.step import zero_initialised_mapping

ROOT = Path(__file__).resolve().parent.parent
# The released checkpoint's 48 names (xadapter.md, "Mapping layers"), written out.
RELEASED_KEYS = sorted(
    [f"body.{i}.block{j}.{p}" for i in range(9) for j in (1, 2) for p in ("weight", "bias")]
    + [f"body.{i}.in_conv.{p}" for i in (3, 6) for p in ("weight", "bias")]
    + [f"body.6.up_opt.op.{p}" for p in ("weight", "bias")]
    + [f"zero_out.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
)


def options(**kw):
    base = dict(batch_size=2, max_steps=4, learning_rate=1e-3, validate_every=0, report_to="none", checkpoint_every=0)
    return TrainOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(write_webdataset(tmp_path_factory.mktemp("data"), 6, per_shard=3))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    """One uninterrupted 4-step run (crossing the epoch boundary at step 3) and the frozen
    weights before and after it."""
    sd15, sdxl, _ = build_tiny_models(0)
    frozen = {"sd15": sd15, "sdxl": sdxl}
    modules = {f"{n}.{a}": getattr(c, a) for n, c in frozen.items()
               for a in ("unet", "vae", "text_encoder", "text_encoder_2") if hasattr(c, a)}
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in modules.items()}
    out = tmp_path_factory.mktemp("run")
    result = train(TrainModels(sd15, sdxl, identity={"kind": "tiny", "tiny_seed": 0}), data, out, options(),
                   progress=False)
    after = {n: m.state_dict() for n, m in modules.items()}
    return result, out, before, after


def test_frozen_weights_are_bit_identical_after_training(uninterrupted):
    result, out, before, after = uninterrupted
    assert result.step == 4 and result.stopped_by is None
    for name, state in before.items():
        for key, value in state.items():
            assert torch.equal(value, after[name][key]), f"{name}.{key}"


def test_adapter_is_the_released_layout_and_loads_everywhere(uninterrupted):
    result, out, _, _ = uninterrupted
    state = load_file(out / "x_adapter.safetensors")
    assert sorted(state) == RELEASED_KEYS
    record = json.loads((out / "x_adapter.json").read_text())
    config = MappingConfig(tuple(record["mapping"]["in_channels"]), tuple(record["mapping"]["out_channels"]))
    module = load_mapping(out / "x_adapter.safetensors")  # widths read off the file; strict: no missing/unexpected key
    assert module.config == config
    assert record["steps"] == 4 and record["training"]["learning_rate"] == 1e-3
    assert any(state[k].abs().sum() > 0 for k in state if k.startswith("zero_out"))


def test_sigterm_then_resume_equals_the_uninterrupted_run_bit_for_bit(tmp_path, data, uninterrupted):
    result, out, _, _ = uninterrupted
    sd15, sdxl, _ = build_tiny_models(0)
    models = TrainModels(sd15, sdxl, identity={"kind": "tiny", "tiny_seed": 0})

    def kill_at_3(step, loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, caught by the loop's handler

    stopped = train(models, data, tmp_path, options(), progress=False, on_step=kill_at_3)
    assert stopped.stopped_by == "SIGTERM" and stopped.step == 3 and stopped.adapter == []
    assert stopped.checkpoint == tmp_path / "checkpoints" / "step-0000003"
    resumed = train(models, data, tmp_path, options(), resume=str(tmp_path), progress=False)
    assert resumed.step == 4
    assert [loss for _, loss in resumed.losses] == [loss for s, loss in result.losses if s > 3]
    a, b = load_file(out / "x_adapter.safetensors"), load_file(tmp_path / "x_adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_rotate_and_resume_refuses_other_settings(tmp_path, data, capsys):
    sd15, sdxl, _ = build_tiny_models(0)
    models = TrainModels(sd15, sdxl, identity={"kind": "tiny", "tiny_seed": 0})
    train(models, data, tmp_path, options(max_steps=3, checkpoint_every=1, keep_checkpoints=2), progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    code = train_cli.main(["--data", data, "--output", str(tmp_path / "again"), "--resume", str(tmp_path),
                           "--batch-size", "2", "--learning-rate", "0.002", "--max-steps", "4", "--no-progress",
                           "--report-to", "none", "--validate-every", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--resume" in err and "--learning-rate" in err
    assert not (tmp_path / "again" / "x_adapter.safetensors").exists()


def test_trained_adapter_changes_the_xa_generate_image(tmp_path, tiny_paths, data, capsys):
    out = tmp_path / "train"
    assert train_cli.main(["--data", data, "--output", str(out), "--batch-size", "2", "--max-steps", "2",
                           "--learning-rate", "0.01", "--no-progress", "--report-to", "none", "--validate-every", "0",
                           "--save-bin"]) == 0
    sd15, sdxl, _ = build_tiny_models(0)
    zero = zero_initialised_mapping(MappingConfig.from_unet_configs(sd15.unet.config, sdxl.unet.config), 0)
    save_file({k: v.contiguous() for k, v in zero.state_dict().items()}, tmp_path / "untrained.safetensors")
    images = {}
    for name, adapter in (("untrained", tmp_path / "untrained.safetensors"), ("trained", out / "x_adapter.safetensors")):
        png = tmp_path / f"{name}.png"
        assert generate.main(["--sd15", str(tiny_paths.sd15_dir), "--sdxl", str(tiny_paths.sdxl_dir), "--adapter",
                              str(adapter), "--prompt", "a red square", "--steps", "4", "--output", str(png),
                              "--no-progress"]) == 0
        images[name] = torch.from_numpy(np.asarray(Image.open(png)).copy())
    assert not torch.equal(images["untrained"], images["trained"])
    released = torch.load(out / "x_adapter.bin", weights_only=True)  # the release's format: a plain state dict
    trained = load_file(out / "x_adapter.safetensors")
    assert sorted(released) == RELEASED_KEYS and all(torch.equal(released[k], trained[k]) for k in trained)


def test_imagefolder_with_metadata_jsonl_trains(tmp_path):
    folder = write_imagefolder(tmp_path / "folder", 4, size=(160, 96))
    sd15, sdxl, _ = build_tiny_models(0)
    result = train(TrainModels(sd15, sdxl, identity={"kind": "tiny"}), str(folder), tmp_path / "out",
                   options(max_steps=1), progress=False)
    assert result.step == 1 and result.stats.used == 4 and result.stats.bad == 0


@pytest.mark.parametrize("argv, flag", [
    (["--batch-size", "0"], "--batch-size"),
    (["--learning-rate", "-1"], "--learning-rate"),
    (["--null-text-share", "1.5"], "--null-text-share"),
    (["--dtype", "fp16"], "--dtype"),
    (["--data", "/nonexistent/shards"], "--data"),
    (["--resume", "/nonexistent/run"], "--resume"),
    (["--sd15", "/nonexistent/sd15"], "--sd15"),
])
def test_bad_input_exits_2_naming_the_flag(tmp_path, data, capsys, argv, flag):
    base = ["--data", data, "--output", str(tmp_path / "out"), "--no-progress", "--report-to", "none"]
    code = train_cli.main(base + argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and flag in err and "Traceback" not in err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_no_usable_sample_and_unwritable_output_stop_before_training(tmp_path, capsys):
    bad = write_webdataset(tmp_path / "bad", 0, corrupt=2, captionless=2)
    code = train_cli.main(["--data", str(bad), "--output", str(tmp_path / "out"), "--no-progress", "--report-to", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "--data" in err and "no usable sample" in err and "2 unreadable, 2 without a caption" in err
    # a read-only place even for root: /proc
    code = train_cli.main(["--data", str(bad), "--output", "/proc/xa-train-out", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: invalid --output") and "writable" in err


def test_too_many_bad_samples_stop_the_run_with_the_count(tmp_path, capsys):
    data = write_webdataset(tmp_path / "data", 4, corrupt=1, captionless=1, per_shard=2)
    code = train_cli.main(["--data", str(data), "--output", str(tmp_path / "out"), "--batch-size", "2", "--no-progress",
                           "--report-to", "none", "--max-bad-share", "0.2", "--validate-every", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--max-bad-share 0.2" in err and "1 unreadable, 1 without a caption" in err


def logged_losses(output: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for events in sorted(output.glob("xa-train/events*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "loss" in acc.Tags()["scalars"]:
            return [(e.step, e.value) for e in acc.Scalars("loss")]
    return []


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, data):
    """accelerate launch, 2 CPU processes (gloo), 2 rows each of a global batch of 4, against
    one process with all 4. They differ only in summation order (two VAE / UNet batches of 2
    and a gloo all-reduce of the gradients, against one batch of 4). Tolerances: the logged
    losses of the 3 steps within 1e-6 relative; parameters (lr 1e-3, so at most 3e-3 from
    the start) 99% within 1e-6 and all within 1e-4, since AdamW's first steps,
    lr * g / (|g| + eps), turn float-rounding differences of near-zero gradients into
    differences up to lr / eps times larger (measured: median 1e-8, largest 7e-5)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = ["--data", data, "--batch-size", "4", "--max-steps", "3", "--learning-rate", "0.001", "--no-progress",
            "--log-every", "1", "--validate-every", "0", "--threads", "1"]
    one = subprocess.run([sys.executable, "-m", "xa_runtime.cli.train", *args, "--output", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "xa_runtime.cli.train", *args, "--output", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "x_adapter.json").read_text())["processes"] == 2
    losses_one, losses_two = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
    assert [s for s, _ in losses_one] == [s for s, _ in losses_two] == [1, 2, 3]
    for (_, a), (_, b) in zip(losses_one, losses_two):
        assert abs(a - b) <= 1e-6 * abs(a), (losses_one, losses_two)
    a, b = load_file(tmp_path / "one" / "x_adapter.safetensors"), load_file(tmp_path / "two" / "x_adapter.safetensors")
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert float(diff.max()) <= 1e-4 and float((diff <= 1e-6).float().mean()) >= 0.99, float(diff.max())


def test_bf16_and_the_open_choices_train_and_validate_through_the_pipeline(tmp_path, data):
    sd15, sdxl, _ = build_tiny_models(0)
    opts = options(max_steps=2, dtype="bf16", gradient_accumulation_steps=2, lr_scheduler="cosine", warmup_steps=1,
                   loss_weighting="min-snr", noise="shared", null_text_share=0.5, validate_every=1,
                   validation_prompts=("a red square",), validation_steps=2, report_to="tensorboard", log_every=1)
    result = train(TrainModels(sd15, sdxl, identity={"kind": "tiny"}), data, tmp_path, opts, progress=False)
    assert result.step == 2 and all(np.isfinite(loss) for _, loss in result.losses)
    assert sdxl.unet.dtype == torch.bfloat16  # frozen weights in the training dtype
    state = load_file(tmp_path / "x_adapter.safetensors")
    assert all(v.dtype == torch.float32 for v in state.values())  # fp32 masters
    for step in (1, 2):
        image = Image.open(tmp_path / "validation" / f"step-{step:07d}-0.png")
        assert image.size == (128, 128)  # the tiny SDXL's square bucket
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = []
    for events in tmp_path.glob("xa-train/events*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        tags += acc.Tags()["images"] + acc.Tags()["scalars"]
    assert {"validation", "loss", "lr"} <= set(tags)


@pytest.mark.slow
def test_the_cli_killed_by_sigterm_checkpoints_exits_143_and_resumes_bit_for_bit(tmp_path, data, uninterrupted):
    """A real `xa-train` process, SIGTERM once its first checkpoint exists; resumed by the CLI,
    the adapter equals the uninterrupted in-process run (same options, one thread) bit for bit."""
    result, out, _, _ = uninterrupted
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "xa_runtime.cli.train", "--data", data, "--output", str(tmp_path), "--batch-size", "2",
            "--max-steps", "4", "--learning-rate", "0.001", "--no-progress", "--report-to", "none",
            "--validate-every", "0", "--threads", "1", "--checkpoint-every", "1"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = 300
    import time

    start = time.monotonic()
    while not (tmp_path / "checkpoints" / "step-0000001").exists():
        assert proc.poll() is None and time.monotonic() - start < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "stopped by SIGTERM" in err, err[-3000:]
    assert not (tmp_path / "x_adapter.safetensors").exists()
    resumed = subprocess.run([*args, "--resume", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(out / "x_adapter.safetensors"), load_file(tmp_path / "x_adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_bench_train_runs_both_variants_and_writes_json(tmp_path):
    from bench_scripts import load_script

    out = tmp_path / "bench.json"
    assert load_script("bench_train").main(["--runs", "1", "--warmup", "0", "--rounds", "1", "--batch-size", "2",
                                            "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record["results"]) == {"naive", "ours"} and record["device"] == "cpu"
    assert all(r["median_s"] > 0 and r["peak_memory_bytes"] > 0 for r in record["results"].values())


def test_a_failed_checkpoint_write_keeps_the_last_good_one(tmp_path, data, monkeypatch):
    from xa_runtime.training import checkpoint as ckpt

    sd15, sdxl, _ = build_tiny_models(0)
    models = TrainModels(sd15, sdxl, identity={"kind": "tiny"})
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if "step-0000002" in str(path) and str(path).endswith("scheduler.pt"):
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        train(models, data, tmp_path, options(max_steps=3, checkpoint_every=1), progress=False)
    root = tmp_path / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-0000001"]  # no partial step-0000002, no temporary folder
    assert ckpt.read_state(root / "step-0000001")["step"] == 1


def test_models_whose_widths_do_not_pair_are_refused(tmp_path, data, capsys):
    sd15, sdxl, _ = build_tiny_models(0)
    with pytest.raises(Exception) as e:
        train(TrainModels(sdxl, sdxl), data, tmp_path, options(), progress=False)
    assert getattr(e.value, "name", "") == "--sd15/--sdxl" and not (tmp_path / "checkpoints").exists()
    other = zero_initialised_mapping(MappingConfig((64, 32, 32), (64, 64, 32)), 0)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "other.safetensors")
    code = train_cli.main(["--data", data, "--output", str(tmp_path / "out"), "--adapter", str(tmp_path / "other.safetensors"),
                           "--no-progress", "--report-to", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "other.safetensors" in err and "Traceback" not in err
