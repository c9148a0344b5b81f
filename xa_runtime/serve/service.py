"""The serving core, without HTTP: checks, a bounded queue, one worker thread, per-request
deadlines (checked between denoising steps through step_callback), metrics and shutdown.

submit() returns a concurrent.futures.Future of an XAdapterOutput, or raises at once:
ParameterError (-> 422), QueueFull (-> 429), Unavailable (-> 503). The future may fail
with DeadlineExceeded (-> 504), Unavailable (shut down before it ran -> 503), a
ParameterError raised while running (-> 422) or anything else (-> 500).
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import ParameterError
from ..pipeline.params import GenerationParams, SizeRules, validate
from .config import Limits, PluginSpec, ServeConfig

log = logging.getLogger("xa_runtime.serve")
OUTCOMES = ("ok", "invalid", "rejected", "deadline", "error", "unavailable")
# A plugin name is a configured key: letters, digits, '-', '_' and '.'; never a path.
PLUGIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


class QueueFull(RuntimeError):
    def __init__(self, retry_after: int):
        self.retry_after = retry_after
        super().__init__(f"the queue is full; retry after {retry_after} s")


class Unavailable(RuntimeError):
    """Not ready, or shutting down."""


class DeadlineExceeded(RuntimeError):
    pass


class _Stop(Exception):
    """Raised from step_callback: deadline passed or shutdown timed out."""


@dataclass
class Job:
    params: GenerationParams
    plugins: list[str]
    deadline: float
    enqueued: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


class Metrics:
    """Prometheus metrics in a registry of their own (several services can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("xa_requests", "Generation requests by outcome", ["outcome"], registry=self.registry)
        for o in OUTCOMES:
            self.requests.labels(o)
        self.queue_depth = Gauge("xa_queue_depth", "Requests waiting for the worker", registry=self.registry)
        self.in_flight = Gauge("xa_in_flight", "Requests running (0 or 1)", registry=self.registry)
        buckets = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
        self.stage_seconds = Histogram("xa_stage_seconds", "Seconds per stage (queue, pipeline stages, total)",
                                       ["stage"], buckets=buckets, registry=self.registry)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Service:
    """One pipeline behind a bounded queue and a single worker thread.

    `pipeline` needs generate(params, plugins=..., step_callback=..., init_image=None) and
    may have size_rules; tests pass stubs. `plugins` maps configured names to built plugin
    objects (step plugins) or ("lora", manager, key, scale) tuples (LoRA scales set per request).
    """

    def __init__(self, pipeline: Any, limits: Limits = Limits(), plugins: dict[str, Any] | None = None,
                 warmup: GenerationParams | None = None):
        self.pipeline, self.limits, self.plugins = pipeline, limits, dict(plugins or {})
        self.rules: SizeRules = getattr(pipeline, "size_rules", SizeRules())
        self.metrics = Metrics()
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=limits.queue_size)
        self._accepting = False
        self._stopping = threading.Event()
        self._abort = threading.Event()
        self._warm = False
        self._warmup = warmup
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ life cycle
    def start(self) -> "Service":
        if self._warmup is not None:
            self.pipeline.generate(self._warmup)
        self._warm = True
        self._accepting = True
        self._thread = threading.Thread(target=self._work, name="xa-serve-worker", daemon=True)
        self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        return self._warm and self._accepting and self._thread is not None and self._thread.is_alive()

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop accepting; let the worker finish what it was given within `timeout` s, then
        stop the running request between steps and fail the rest (503). True if all finished."""
        timeout = self.limits.shutdown_timeout_s if timeout is None else timeout
        with self._lock:
            self._accepting = False
        self._stopping.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        clean = not self._thread.is_alive()
        if not clean:
            self._abort.set()
            self._thread.join(max(5.0, timeout))
        self._fail_queued(Unavailable("the server shut down before this request ran"))
        return clean

    def _fail_queued(self, error: Exception) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            self.metrics.requests.labels("unavailable").inc()
            job.future.set_exception(error)
        self.metrics.queue_depth.set(0)

    # ------------------------------------------------------------------ requests
    def check(self, params: GenerationParams, plugins: list[str]) -> GenerationParams:
        """Serving limits, then the pipeline's own validation; ParameterError names the field."""
        lim = self.limits
        for name in ("prompt", "prompt_sd15", "negative_prompt"):
            value = getattr(params, name)
            texts = [value] if isinstance(value, str) else list(value or [])
            if any(isinstance(t, str) and len(t) > lim.max_prompt_chars for t in texts):
                raise ParameterError(name, f"<{max(len(t) for t in texts)} characters>",
                                     f"at most {lim.max_prompt_chars} characters")
        steps = params.num_inference_steps
        if isinstance(steps, int) and not isinstance(steps, bool) and steps > lim.max_steps:
            raise ParameterError("num_inference_steps", steps, f"an integer in [1, {lim.max_steps}] on this server")
        for name in ("height", "width"):
            v = getattr(params, name)
            if isinstance(v, int) and v > lim.max_side:
                raise ParameterError(name, v, f"at most {lim.max_side} pixels on this server")
        n = 1 if isinstance(params.prompt, str) else len(params.prompt or [])
        batch = params.num_images_per_prompt
        if isinstance(batch, int) and n * batch > lim.max_batch:
            raise ParameterError("num_images_per_prompt", batch,
                                 f"at most {lim.max_batch} images per request ({n} prompts x {batch})")
        for name in plugins:
            if not isinstance(name, str) or not PLUGIN_NAME.match(name) or ".." in name:
                raise ParameterError("plugins", name, "a configured plugin name (never a path)")
            if name not in self.plugins:
                known = ", ".join(sorted(self.plugins)) or "none configured"
                raise ParameterError("plugins", name, f"a configured plugin name: {known}")
        if len(set(plugins)) != len(plugins):
            raise ParameterError("plugins", plugins, "each plugin at most once")
        return validate(params, self.rules)

    def submit(self, params: GenerationParams, plugins: list[str] = (), timeout_s: float | None = None) -> Future:
        plugins = list(plugins)
        try:
            resolved = self.check(params, plugins)
        except ParameterError:
            self.metrics.requests.labels("invalid").inc()
            raise
        budget = self.limits.deadline_s if timeout_s is None else min(timeout_s, self.limits.deadline_s)
        job = Job(resolved, plugins, time.monotonic() + budget)
        with self._lock:
            if not self._accepting:
                self.metrics.requests.labels("unavailable").inc()
                raise Unavailable("the server is not accepting requests (starting or shutting down)")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                self.metrics.requests.labels("rejected").inc()
                raise QueueFull(self.limits.retry_after_s) from None
            self.metrics.queue_depth.set(self._queue.qsize())
        return job.future

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        while True:
            try:
                job = self._queue.get(timeout=0.05)
            except queue.Empty:
                if self._stopping.is_set():
                    return
                continue
            self.metrics.queue_depth.set(self._queue.qsize())
            if self._abort.is_set():
                self.metrics.requests.labels("unavailable").inc()
                job.future.set_exception(Unavailable("the server shut down before this request ran"))
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        m = self.metrics
        started = time.monotonic()
        m.stage_seconds.labels("queue").observe(started - job.enqueued)
        if not job.future.set_running_or_notify_cancel():
            return
        if started >= job.deadline:
            m.requests.labels("deadline").inc()
            job.future.set_exception(DeadlineExceeded("the deadline passed while the request waited in the queue"))
            return

        def step_callback(stage: str, i: int, steps: int) -> None:
            if self._abort.is_set():
                raise _Stop("shutdown")
            if time.monotonic() >= job.deadline:
                raise _Stop(f"deadline passed during {stage} after step {i + 1} of {steps}")

        m.in_flight.set(1)
        try:
            plugins = self._activate(job.plugins)
            out = self.pipeline.generate(job.params, plugins=plugins, step_callback=step_callback, init_image=None)
        except _Stop as e:
            outcome = "unavailable" if self._abort.is_set() else "deadline"
            m.requests.labels(outcome).inc()
            job.future.set_exception(Unavailable(str(e)) if outcome == "unavailable" else DeadlineExceeded(str(e)))
        except ParameterError as e:
            m.requests.labels("invalid").inc()
            job.future.set_exception(e)
        except Exception as e:  # noqa: BLE001 -- reported as 500; the worker keeps serving
            log.exception("generation failed")
            m.requests.labels("error").inc()
            job.future.set_exception(e)
        else:
            for stage, seconds in getattr(out, "timings", {}).items():
                m.stage_seconds.labels(stage).observe(seconds)
            m.stage_seconds.labels("total").observe(time.monotonic() - job.enqueued)
            m.requests.labels("ok").inc()
            job.future.set_result(out)
        finally:
            m.in_flight.set(0)

    def _activate(self, names: list[str]) -> list[Any]:
        """LoRAs: the named ones at their scale, the others at 0 (unfused: free). Step plugins: the named ones."""
        step_plugins = []
        for name, plugin in self.plugins.items():
            if isinstance(plugin, tuple) and plugin[0] == "lora":
                _, manager, key, scale = plugin
                manager.set_scale(key, scale if name in names else 0.0)
            elif name in names:
                step_plugins.append(plugin)
        return step_plugins


def build_service(cfg: ServeConfig, warm: bool = True) -> Service:
    """Load the configured models and plugins (everything is read here, once, at start)."""
    import torch

    from ..pipeline import XAdapterPipeline
    from .config import DTYPES

    dtype = getattr(torch, DTYPES[cfg.dtype])
    if cfg.tiny:
        pipe = XAdapterPipeline.from_tiny(cfg.tiny_seed, device=cfg.device, dtype=dtype, progress=False)
    else:
        pipe = XAdapterPipeline.from_pretrained(cfg.sd15, cfg.sdxl, cfg.adapter, device=cfg.device, dtype=dtype,
                                                progress=False)
    plugins = load_plugins(cfg.plugins, pipe)
    rules = pipe.size_rules
    warmup = GenerationParams(prompt="warm-up", num_inference_steps=1, adapter_guidance_start=1.0,
                              height=rules.sdxl_multiple, width=rules.sdxl_multiple,
                              height_sd15=rules.sd15_multiple, width_sd15=rules.sd15_multiple, seed=0)
    return Service(pipe, cfg.limits, plugins, warmup=replace(warmup) if warm else None)


def load_plugins(specs: dict[str, PluginSpec], pipe: Any) -> dict[str, Any]:
    from PIL import Image

    from ..plugins import load_controlnet_plugin, load_nexus_adapter_plugin, load_t2i_adapter_plugin
    from ..plugins.lora import LoraManager, load_lora

    out: dict[str, Any] = {}
    managers: dict[str, Any] = {}
    for name, s in specs.items():
        if s.kind in ("lora", "sdxl_lora"):
            branch = pipe.sd15 if s.kind == "lora" else pipe.sdxl
            manager = managers.setdefault(s.kind, LoraManager.for_branch(branch, "unfused"))
            manager.add(name, load_lora(s.path), 0.0)
            out[name] = ("lora", manager, name, s.scale)
            continue
        with Image.open(s.image) as im:
            image = im.convert("RGB")
        unet = pipe.sd15.unet
        if s.kind == "controlnet":
            out[name] = load_controlnet_plugin(s.path, image, unet=unet, conditioning_scale=s.scale)
        elif s.kind == "t2i":
            out[name] = load_t2i_adapter_plugin(s.path, image, unet=unet, scale=s.scale)
        else:
            out[name] = load_nexus_adapter_plugin(s.path, image, unet=unet, scale=s.scale)
    return out
