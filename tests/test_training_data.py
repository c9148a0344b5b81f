"""xa-train's data and command line without training: buckets at the real sizes, SDXL's
crop conditioning, the deterministic order, bad samples counted, and xa-train's shared
flags spelled as in the other CLIs."""

import argparse

import pytest
from PIL import Image

from xa_runtime.cli import generate
from xa_runtime.cli import train as train_cli
from xa_runtime.errors import ParameterError
from xa_runtime.testing.training_data import write_imagefolder, write_webdataset
from xa_runtime.training.data import (Bucket, DataStats, Sample, iter_batches, iter_samples, make_buckets,
                                      nearest_bucket, open_source, prepare_row)
from xa_runtime.training.options import TrainOptions, check_options


def test_buckets_at_the_released_sizes_pair_exactly():
    # SDXL latents: multiple of 32 px; SD1.5: multiple of 64 px; the released ratio 2
    buckets = make_buckets(1024, 512, 32, 64, max_aspect=2.0)
    assert Bucket((1024, 1024), (512, 512)) in buckets
    for b in buckets:
        (h, w), (oh, ow) = b.new_hw, b.old_hw
        assert (oh * 2, ow * 2) == (h, w) and h % 128 == 0 and w % 128 == 0
        assert h * w <= 1024 * 1024 and max(h / w, w / h) <= 2.0
    assert {(768, 1280), (1280, 768)} <= {b.new_hw for b in buckets}
    assert nearest_bucket(buckets, 600, 1000).new_hw == (768, 1280)  # landscape 5:3
    assert make_buckets(1024, 512, 32, 64, 2.0, bucketing=False) == [Bucket((1024, 1024), (512, 512))]


def test_crop_conditioning_and_both_models_see_the_same_picture():
    image = Image.new("RGB", (300, 100), (0, 0, 0))
    image.paste((255, 255, 255), (150, 0, 300, 100))  # right half white
    row = prepare_row(Sample("k", image, "half white"), Bucket((128, 256), (64, 128)))
    # cover 128 x 256: scale 1.28 -> 384 x 128, centre crop left = (384 - 256) // 2 = 64
    assert row.time_ids == (100, 300, 0, 64, 128, 256)
    assert row.pixels_new.shape == (3, 128, 256) and row.pixels_old.shape == (3, 64, 128)
    for px in (row.pixels_new, row.pixels_old):
        w = px.shape[-1]
        assert px[:, :, : w // 4].mean() < -0.9 and px[:, :, -w // 4:].mean() > 0.9


def test_order_is_deterministic_per_seed_and_epoch_and_bad_samples_are_counted(tmp_path):
    source = open_source(str(write_webdataset(tmp_path / "d", 8, per_shard=2, corrupt=1, captionless=2)))

    def keys(seed, epoch):
        stats = DataStats()
        return [s.key for s in iter_samples(source, seed, epoch, stats, shuffle_buffer=3)], stats

    (a, stats), (b, _) = keys(0, 0), keys(0, 0)
    assert a == b and len(a) == 8 and keys(0, 1)[0] != a and keys(1, 0)[0] != a
    assert (stats.seen, stats.used, stats.corrupt, stats.captionless) == (11, 8, 1, 2)


def test_imagefolder_reads_metadata_and_counts_missing_files(tmp_path):
    folder = write_imagefolder(tmp_path / "f", 3)
    with open(folder / "metadata.jsonl", "a") as f:
        f.write('{"file_name": "missing.png", "text": "gone"}\n{"file_name": "00000.png"}\nnot json\n')
    stats = DataStats()
    samples = list(iter_samples(open_source(str(folder)), 0, 0, stats, 10))
    assert len(samples) == 3 and stats.corrupt == 1 and stats.captionless == 2
    assert {s.caption for s in samples} >= {"a red square on a grey background"}


def test_batches_take_one_bucket_and_drop_the_incomplete(tmp_path):
    sizes = [(96, 96), (192, 96), (96, 96), (192, 96), (96, 96)]  # 3 square, 2 wide
    source = open_source(str(write_webdataset(tmp_path / "d", 5, sizes=sizes)))
    buckets = make_buckets(256, 128, 32, 64, 3.0)  # side steps of 128 px: 256 x 256 and 128 x 384 (3:1)
    batches = list(iter_batches(iter_samples(source, 0, 0, DataStats(), 10), buckets, 2))
    assert len(batches) == 2 and {b.new_hw for b, _ in batches} == {(256, 256), (128, 384)}
    for bucket, samples in batches:
        assert all(nearest_bucket(buckets, s.image.height, s.image.width) == bucket for s in samples)


def test_options_are_checked_with_the_flag_named():
    assert check_options(TrainOptions()) == TrainOptions()
    for field, value, flag in [("batch_size", 0, "--batch-size"), ("noise", "maybe", "--noise"),
                               ("max_bad_share", 2.0, "--max-bad-share"), ("learning_rate", float("nan"), "--learning-rate")]:
        with pytest.raises(ParameterError) as e:
            check_options(TrainOptions(**{field: value}))
        assert e.value.name == flag


def test_paper_defaults_and_shared_flags_match_the_other_clis():
    train_flags = {s: a for a in train_cli.build_parser()._actions for s in a.option_strings}
    gen_flags = {s: a for a in generate.build_parser()._actions for s in a.option_strings}
    args = train_cli.build_parser().parse_args(["--data", "d", "--output", "o"])
    assert (args.learning_rate, args.batch_size, args.epochs) == (1e-5, 8, 2)
    for flag in ("--sd15", "--sdxl", "--adapter", "--sdxl-vae", "--tiny", "--tiny-seed", "--device", "--dtype",
                 "--threads", "--no-progress", "--debug"):
        a, b = train_flags[flag], gen_flags[flag]
        assert (type(a), a.type, a.dest, a.default) == (type(b), b.type, b.dest, b.default), flag
        assert (list(a.choices) if a.choices else None) == (list(b.choices) if b.choices else None), flag
    assert isinstance(train_flags["--version"], argparse._VersionAction)
    assert all(a.help for a in train_flags.values())
