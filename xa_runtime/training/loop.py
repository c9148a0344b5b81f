"""The training run on accelerate: device and mixed precision, DDP over processes, the
optimizer loop with gradient accumulation and clipping, trackers, a progress bar,
checkpoints every N steps and on SIGTERM/SIGINT, resume, validation, the final adapter.

Every process reads the same data stream and draws the same random numbers for the global
batch, then takes its rows; DDP averages the gradients. So one command gives the same
training on any number of processes (up to floating-point summation order), and a resume
replays to the exact position.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from ..errors import ParameterError
from ..models.components import SD15Components, SDXLComponents, quiet_casts
from ..models.mapping import MappingConfig, MappingLayers
from ..pipeline.schedulers import schedule_mismatch
from . import checkpoint as ckpt
from .cache import build_cache, iter_cached_batches, open_cache
from .data import (Bucket, DataSource, DataStats, check_bad_share, iter_batches, iter_samples, make_buckets,
                   open_source, prepare_row)
from .options import TrainOptions, check_options
from .step import TrainableMapping, XAdapterTrainingStep, zero_initialised_mapping

MIXED_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class TrainModels:
    """The frozen pair, optional starting weights for the mapping layers, and what identifies
    the pair in checkpoints (paths, or the tiny models' seed)."""

    sd15: SD15Components
    sdxl: SDXLComponents
    init_mapping: MappingLayers | None = None
    identity: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What a run did: optimizer steps done, the reason it stopped early (a signal name) or
    None, the files written, the sample counts, the logged losses (step, loss)."""

    step: int
    stopped_by: str | None
    adapter: list[Path]
    checkpoint: Path | None
    stats: DataStats
    losses: list[tuple[int, float]]


def size_multiples(c: SD15Components | SDXLComponents) -> tuple[int, int]:
    """(pixel multiple a side must be, the model's default side)."""
    factor = 2 ** (len(c.vae.config.block_out_channels) - 1)
    return factor * 2 ** (len(c.unet.config.block_out_channels) - 1), c.unet.config.sample_size * factor


def buckets_for(models: TrainModels, o: TrainOptions) -> list[Bucket]:
    (old_multiple, old_default), (new_multiple, new_default) = size_multiples(models.sd15), size_multiples(models.sdxl)
    new_res, old_res = o.resolution or new_default, o.resolution_sd15 or old_default
    if new_res < new_multiple or old_res < old_multiple:
        raise ParameterError("--resolution/--resolution-sd15", [new_res, old_res],
                             f"at least {new_multiple} / {old_multiple} px for these models")
    return make_buckets(new_res, old_res, new_multiple, old_multiple, o.max_aspect_ratio, o.bucketing)


def count_samples(source: DataSource) -> int:
    """Samples in the data (image folder: metadata rows; shards: captions, from tar headers only)."""
    if source.kind == "imagefolder":
        return len(source.entries)
    total = 0
    for shard in source.shards:
        try:
            with tarfile.open(shard) as tar:
                total += sum(1 for name in tar.getnames() if name.endswith(".txt"))
        except (OSError, tarfile.TarError):
            continue
    return total


def preflight(source: DataSource, buckets: list[Bucket], o: TrainOptions) -> None:
    """ParameterError naming --data unless epoch 0 yields one full global batch."""
    stats = DataStats()
    first = next(iter_batches(iter_samples(source, o.seed, 0, stats, o.shuffle_buffer), buckets, o.batch_size), None)
    if first is not None:
        return
    what = "no usable sample" if stats.seen == stats.bad else f"fewer usable samples than --batch-size {o.batch_size} in every bucket"
    raise ParameterError("--data", source.path, f"captioned images; {what} ({stats.describe()})")


class _StopFlag:
    """SIGTERM/SIGINT ask the loop to stop after the current optimizer step (and checkpoint)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in EXIT_SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _place(models: TrainModels, device: torch.device, weight_dtype: torch.dtype, vae_dtype: torch.dtype,
           checkpointing: bool) -> None:
    with quiet_casts():
        for m in (models.sd15.unet, models.sdxl.unet, models.sd15.text_encoder, models.sdxl.text_encoder,
                  models.sdxl.text_encoder_2):
            m.to(device=device, dtype=weight_dtype).eval().requires_grad_(False)
        models.sd15.vae.to(device=device, dtype=weight_dtype).eval().requires_grad_(False)
        models.sdxl.vae.to(device=device, dtype=vae_dtype).eval().requires_grad_(False)
    if checkpointing:
        models.sdxl.unet.enable_gradient_checkpointing()


def train(models: TrainModels, data: str, output: str | Path, options: TrainOptions, *, device: str = "cpu",
          resume: str | None = None, progress: bool = True,
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train the mapping layers of `models` on `data`; write checkpoints and the final
    adapter under `output`. `on_step(step, loss)` is called after every optimizer step.
    The frozen models are placed on the device in the training dtype (`options.dtype`)."""
    from accelerate.state import AcceleratorState

    try:
        return _train(models, data, output, options, device, resume, progress, on_step)
    finally:
        # accelerate keeps one process-wide state (mixed precision, device); a later run in
        # this process may choose others. The process group (PartialState) is left alone.
        with contextlib.suppress(Exception):
            AcceleratorState._reset_state()


def _train(models: TrainModels, data: str, output: str | Path, options: TrainOptions, device: str,
           resume: str | None, progress: bool, on_step: Callable[[int, float], None] | None) -> TrainResult:
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    o = check_options(options)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if device == "cpu" and o.dtype == "fp16":
        raise ParameterError("--dtype", "fp16", "fp32 or bf16 with --device cpu (fp16 mixed precision needs a GPU)")
    mismatch = schedule_mismatch(models.sd15.scheduler_config, models.sdxl.scheduler_config)
    if mismatch:
        raise ParameterError("--sd15/--sdxl", mismatch, "models on one noise schedule (both branches share t)")
    try:
        config = MappingConfig.from_unet_configs(models.sd15.unet.config, models.sdxl.unet.config)
    except ValueError as e:
        raise ParameterError("--sd15/--sdxl", "", f"an SD1.5-like and an SDXL-like pair: {e}") from None
    if models.init_mapping is not None and models.init_mapping.config != config:
        raise ParameterError("--adapter", str(models.init_mapping.config), f"mapping layers of widths {config}")
    buckets = buckets_for(models, o)
    source = open_source(data)

    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=MIXED_PRECISION[o.dtype],
                              log_with=None if o.report_to == "none" else o.report_to, project_dir=str(output))
    world, rank = accelerator.num_processes, accelerator.process_index
    kind = str(accelerator.distributed_type).split(".")[-1]
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ParameterError("accelerate config (distributed_type)", kind, "one process or DDP (MULTI_GPU, MULTI_CPU): "
                             "the 213M trainable parameters and their optimizer state fit every GPU (docs/training.md)")
    if o.batch_size % world:
        raise ParameterError("--batch-size", o.batch_size, f"a multiple of the {world} processes (it is the global batch)")
    fp = ckpt.fingerprint(o, config, models.identity, data)
    resume_dir = None
    if resume is not None:
        resume_dir = ckpt.resolve_resume(resume)
        resume_state = ckpt.read_state(resume_dir)
        ckpt.check_fingerprint(resume_dir, resume_state, fp)
    cache_fp = {"models": models.identity, "data": fp["data"], "dtype": o.dtype,
                "buckets": [[list(b.new_hw), list(b.old_hw)] for b in buckets]}
    cache = open_cache(Path(o.cache), cache_fp) if o.cache else None
    if cache is None:
        preflight(source, buckets, o)

    dev = accelerator.device
    weight_dtype = TORCH_DTYPES[o.dtype]
    # SDXL's VAE overflows in fp16 (force_upcast): fp32 there, as the pipeline places it
    vae_dtype = torch.float32 if o.dtype == "fp16" and models.sdxl.vae.config.force_upcast else weight_dtype
    _place(models, dev, weight_dtype, vae_dtype, o.gradient_checkpointing)
    mapping = models.init_mapping if models.init_mapping is not None else zero_initialised_mapping(config, o.seed)
    mapping.to(dev, torch.float32).train().requires_grad_(True)
    step_fn = XAdapterTrainingStep(models.sd15, models.sdxl, o, dev, weight_dtype, vae_dtype)
    if o.cache and cache is None:
        if accelerator.is_main_process:
            build_cache(Path(o.cache), source, buckets, step_fn, cache_fp, o.max_bad_share, progress)
        accelerator.wait_for_everyone()
        cache = open_cache(Path(o.cache), cache_fp)
    if cache is not None and next(iter_cached_batches(cache, o.seed, 0, o.batch_size), None) is None:
        raise ParameterError("--data", data, f"captioned images; the cache holds fewer usable samples than --batch-size "
                             f"{o.batch_size} in every bucket ({cache.stats.describe()})")
    trainable = TrainableMapping(mapping, o.gradient_checkpointing)
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2),
                                  eps=o.adam_epsilon, weight_decay=o.weight_decay)
    samples_per_epoch = len(cache.entries) if cache is not None else count_samples(source)
    per_epoch = samples_per_epoch // (o.batch_size * o.gradient_accumulation_steps)
    total = o.max_steps if o.max_steps is not None else max(1, per_epoch) * o.epochs
    # Not prepared by accelerate: it would step the schedule once per process per step.
    lr_scheduler = get_scheduler(o.lr_scheduler, optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=total)
    trainable, optimizer = accelerator.prepare(trainable, optimizer)

    generator = torch.Generator().manual_seed(o.seed)
    step, epoch, index = 0, 0, 0
    stats_before = DataStats()
    if resume_dir is not None:
        rng = ckpt.load_checkpoint(resume_dir, mapping, optimizer, lr_scheduler, accelerator.scaler)
        generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        step, epoch, index = resume_state["step"], resume_state["epoch"], resume_state["index"]
        stats_before = DataStats(**resume_state["stats_before_epoch"])
    stats = DataStats()  # the current epoch's
    validator = None
    if o.validate_every and accelerator.is_main_process:
        from .validation import Validator

        square = max(buckets, key=lambda b: -abs(b.new_hw[0] - b.new_hw[1]))
        validator = Validator(models.sd15, models.sdxl, mapping, dev, weight_dtype, o.validation_prompts,
                              o.validation_steps, (*square.new_hw, *square.old_hw))
    if o.report_to != "none":
        accelerator.init_trackers("xa-train", config={k: v for k, v in o.to_dict().items()
                                                      if isinstance(v, (int, float, str, bool))})

    start_epoch, start_index = epoch, index

    def stream() -> Iterator[tuple[int, int, Bucket | None, list]]:
        nonlocal stats, stats_before
        e = start_epoch
        while o.max_steps is not None or e < o.epochs:
            skip = start_index if e == start_epoch else 0
            if cache is not None:
                epoch_batches: Iterator = iter_cached_batches(cache, o.seed, e, o.batch_size)
            else:
                epoch_batches = iter_batches(iter_samples(source, o.seed, e, stats, o.shuffle_buffer, o.max_bad_share),
                                             buckets, o.batch_size)
            for i, (bucket, samples) in enumerate(epoch_batches):
                if i >= skip:
                    yield e, i + 1, bucket, samples
            check_bad_share(stats, o.max_bad_share)
            stats_before = DataStats(**{k: getattr(stats_before, k) + getattr(stats, k) for k in stats.to_dict()})
            stats = DataStats()
            e += 1
            yield e, 0, None, []  # an epoch boundary: the position moves even when no batch follows

    per_process = o.batch_size // world
    mine = slice(rank * per_process, (rank + 1) * per_process)
    batches = stream()
    losses: list[tuple[int, float]] = []
    last_ckpt: Path | None = None
    bar = tqdm(total=total, initial=step, desc="xa-train", unit="step", disable=not (progress and accelerator.is_main_process))
    stopped_by = None

    def save(at: int) -> Path | None:
        accelerator.wait_for_everyone()
        saved = None
        if accelerator.is_main_process:
            rng = {"generator": generator.get_state(), "torch": torch.get_rng_state(), "python": random.getstate()}
            state = {"epoch": epoch, "index": index, "stats_before_epoch": stats_before.to_dict(),
                     "stats_current_epoch": stats.to_dict(), "fingerprint": fp}
            saved = ckpt.save_checkpoint(output, at, mapping, optimizer, lr_scheduler, accelerator.scaler, rng, state,
                                         o.keep_checkpoints)
        accelerator.wait_for_everyone()
        return saved

    with _StopFlag() as stop:
        while step < total:
            micro = []
            while len(micro) < o.gradient_accumulation_steps:
                item = next(batches, None)
                if item is None:
                    break
                epoch, index, bucket, samples = item
                if samples:
                    micro.append((bucket, samples))
            if len(micro) < o.gradient_accumulation_steps:
                break  # the data ran out (epochs done) before a full step
            loss_sum = torch.zeros((), device=dev)
            for k, (bucket, samples) in enumerate(micro):
                draws = step_fn.draw(len(samples), bucket.new_hw, bucket.old_hw, generator)
                if cache is not None:
                    inputs = step_fn.prepare_cached([cache.row(i) for i in samples[mine]], draws.take(mine))
                else:
                    inputs = step_fn.prepare([prepare_row(s, bucket) for s in samples[mine]], draws.take(mine))
                sync = contextlib.nullcontext() if k == len(micro) - 1 else accelerator.no_sync(trainable)
                with sync:
                    with accelerator.autocast():
                        loss = step_fn.loss(inputs, trainable)
                    accelerator.backward(loss / len(micro))
                loss_sum += loss.detach() / len(micro)
            if o.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable.parameters(), o.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = float(accelerator.reduce(loss_sum, "mean"))
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"the loss became {loss_value} at step {step}; with --dtype fp16 try bf16")
            losses.append((step, loss_value))
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if step % o.log_every == 0 or step == total:
                accelerator.log({"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0],
                                 "samples_skipped": stats_before.bad + stats.bad}, step=step)
            if on_step is not None:
                on_step(step, loss_value)
            if o.checkpoint_every and step % o.checkpoint_every == 0:
                last_ckpt = save(step)
            if validator is not None and step % o.validate_every == 0:
                images = validator(mapping, step, output)
                for tracker in accelerator.trackers:
                    with contextlib.suppress(NotImplementedError, AttributeError):
                        tracker.log_images({"validation": images}, step=step, dataformats="NHWC")
            flag = torch.tensor([1.0 if stop.signal else 0.0], device=dev)
            if world > 1:
                flag = accelerator.reduce(flag, "sum")
            if float(flag) > 0:
                stopped_by = stop.signal or "signal"
                if not (o.checkpoint_every and step % o.checkpoint_every == 0):
                    last_ckpt = save(step)
                break
    bar.close()
    total_stats = DataStats(**{k: getattr(stats_before, k) + getattr(stats, k) for k in stats.to_dict()})
    if cache is not None:
        total_stats = cache.stats
    written: list[Path] = []
    if stopped_by is None and accelerator.is_main_process:
        record = {"format": "xa-runtime X-Adapter mapping layers", "key_layout": "X_Adapter_v1 (body.N.*, zero_out.N.*)",
                  "mapping": fp["mapping"], "models": models.identity, "data": fp["data"], "steps": step,
                  "training": o.to_dict(), "processes": world, "samples": total_stats.to_dict()}
        written = ckpt.write_adapter(output, mapping, record, o.save_bin)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(step, stopped_by, written, last_ckpt, total_stats, losses)
