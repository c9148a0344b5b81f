"""The latent / embedding cache: cached step inputs equal the encoded ones (within the
VAE's batch-of-1 vs batch-of-2 rounding), a run from the cache never calls a VAE or the old
text encoder, is deterministic, and a cache built for other settings is refused by flag."""

import torch
from safetensors.torch import load_file

from xa_runtime.cli import train as train_cli
from xa_runtime.models.tiny import build_tiny_models
from xa_runtime.testing.training_data import write_webdataset
from xa_runtime.training import TrainModels, TrainOptions, train
from xa_runtime.training.cache import build_cache, open_cache
from xa_runtime.training.data import DataStats, iter_batches, iter_samples, make_buckets, open_source, prepare_row
from xa_runtime.training.step import XAdapterTrainingStep


def test_cached_inputs_equal_encoded_inputs(tmp_path):
    sd15, sdxl, _ = build_tiny_models(0)
    source = open_source(str(write_webdataset(tmp_path / "d", 2)))
    buckets = make_buckets(128, 64, 32, 64, 2.0)
    step = XAdapterTrainingStep(sd15, sdxl, TrainOptions(null_text_share=0.5), torch.device("cpu"), torch.float32,
                                torch.float32)
    build_cache(tmp_path / "cache", source, buckets, step, {"test": 1}, max_bad_share=0.0)
    cache = open_cache(tmp_path / "cache", {"test": 1})
    bucket, samples = next(iter_batches(iter_samples(source, 0, 0, DataStats(), 1), buckets, 2))
    draws = step.draw(2, bucket.new_hw, bucket.old_hw, torch.Generator().manual_seed(0))
    encoded = step.prepare([prepare_row(s, bucket) for s in samples], draws)
    by_key = {e["key"]: i for i, e in enumerate(cache.entries)}
    cached = step.prepare_cached([cache.row(by_key[s.key]) for s in samples], draws)
    for name in ("noisy_new", "noisy_old", "emb_old", "emb_new", "text_embeds", "time_ids", "target", "timesteps"):
        torch.testing.assert_close(getattr(cached, name), getattr(encoded, name), rtol=1e-5, atol=1e-5, msg=name)


def test_training_from_the_cache_skips_the_encoders_and_is_deterministic(tmp_path, monkeypatch):
    data = str(write_webdataset(tmp_path / "d", 4))
    opts = TrainOptions(batch_size=2, max_steps=2, learning_rate=1e-3, validate_every=0, report_to="none",
                        checkpoint_every=0, cache=str(tmp_path / "cache"))
    sd15, sdxl, _ = build_tiny_models(0)
    models = TrainModels(sd15, sdxl, identity={"kind": "tiny"})
    first = train(models, data, tmp_path / "a", opts, progress=False)
    index_time = (tmp_path / "cache" / "index.json").stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("an encoder ran although the cache holds its output")

    for module in (sd15.vae, sdxl.vae):
        monkeypatch.setattr(module, "encode", refuse)
    monkeypatch.setattr(sd15.text_encoder, "forward", refuse)
    second = train(models, data, tmp_path / "b", opts, progress=False)
    assert (tmp_path / "cache" / "index.json").stat().st_mtime_ns == index_time  # reused, not rebuilt
    assert first.losses == second.losses and second.stats.used == 4
    a, b = load_file(tmp_path / "a" / "x_adapter.safetensors"), load_file(tmp_path / "b" / "x_adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_cache_for_other_settings_is_refused_naming_the_flag(tmp_path, capsys):
    data = str(write_webdataset(tmp_path / "d", 2))
    base = ["--data", data, "--batch-size", "2", "--max-steps", "1", "--no-progress", "--report-to", "none",
            "--validate-every", "0", "--cache", str(tmp_path / "cache")]
    assert train_cli.main([*base, "--output", str(tmp_path / "a")]) == 0
    code = train_cli.main([*base, "--output", str(tmp_path / "b"), "--resolution", "256"])
    err = capsys.readouterr().err
    assert code == 2 and "--cache" in err
