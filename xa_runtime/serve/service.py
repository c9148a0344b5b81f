"""The serving core, without HTTP: checks, a bounded queue, one worker thread, per-request
deadlines (checked between denoising steps through step_callback), metrics and shutdown.

submit() returns a Ticket (a concurrent.futures.Future of an XAdapterOutput), or raises at
once: ParameterError (-> 422), QueueFull (-> 429), Unavailable (-> 503). The ticket may fail
with DeadlineExceeded (-> 504), Unavailable (shut down before it ran -> 503), Cancelled
(ticket.abandon(): the client went away), a ParameterError raised while running (-> 422) or
anything else (-> 500).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import re
import threading
import time
import traceback
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import CheckpointError, ParameterError
from ..pipeline.params import MAX_SEED, GenerationParams, SizeRules, validate
from ..plugin_kinds import IMAGE_KINDS, KINDS, LORA_KINDS, PluginSpec
from .config import ConfigError, Limits, ServeConfig
from .progress import JobProgress, expected_steps

log = logging.getLogger("xa_runtime.serve")
OUTCOMES = ("ok", "invalid", "rejected", "deadline", "cancelled", "error", "unavailable")
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


class Cancelled(RuntimeError):
    """The request was abandoned (client disconnected) before or while it ran."""


class _Stop(Exception):
    """Raised from step_callback: deadline passed, request abandoned or shutdown timed out."""


class Ticket(Future):
    """The future of one request, plus its queue and run seconds (set when it finishes) and
    abandon(): a queued request is dropped, a running one stops at the next denoising step."""

    def __init__(self) -> None:
        super().__init__()
        self.abandoned = threading.Event()
        self.reason = "abandoned"  # or "interrupted" (POST /sdapi/v1/interrupt)
        self.queue_seconds: float | None = None
        self.run_seconds: float | None = None
        self.progress: JobProgress | None = None  # set by Service.submit

    def abandon(self, reason: str = "abandoned") -> None:
        self.reason = reason
        self.abandoned.set()

    def set_result(self, result: Any) -> None:
        with contextlib.suppress(InvalidStateError):  # answered already (a shutdown past its timeout)
            super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        with contextlib.suppress(InvalidStateError):
            super().set_exception(exception)


@dataclass
class Job:
    params: GenerationParams
    plugins: list[str]
    deadline: float
    images: dict[str, Any] = field(default_factory=dict)  # plugin name -> per-request image
    init_image: Any = None
    enqueued: float = field(default_factory=time.monotonic)
    future: Ticket = field(default_factory=Ticket)


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

    `pipeline` needs generate(params, plugins=..., step_callback=..., init_image=...) and
    may have size_rules; tests pass stubs. `plugins` maps configured names to Served entries
    (load_plugins: their kind, and the step plugin, or for LoRAs the configured scale: the
    LoRA itself lives in the pipeline under that name, its weight set per request with
    set_adapters) or to bare step plugins (those with with_image(image) take per-request
    images). `needs_image`: the image plugins with no configured image, which every request
    naming them must send one for.
    """

    def __init__(self, pipeline: Any, limits: Limits = Limits(), plugins: dict[str, Any] | None = None,
                 warmup: GenerationParams | None = None, needs_image: Any = (),
                 specs: dict[str, PluginSpec] | None = None):
        self.pipeline, self.limits, self.plugins = pipeline, limits, dict(plugins or {})
        self.needs_image = set(needs_image)
        self.specs = dict(specs or {})  # the config's plugin entries, for describe_plugins
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
        self.running: Ticket | None = None  # the request the worker runs now
        self.model_name = "xa-runtime"      # what the A1111 and OpenAI routes call the model
        self.previews = False               # keep latents of every request (A1111's live previews)

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
    def queue_depth(self) -> int:
        return self._queue.qsize()

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
        if self._abort.is_set():  # a second call (the app's shutdown after the signal's drain): done already
            self._thread.join(0)
            return not self._thread.is_alive()
        grace = min(5.0, timeout / 4)  # for the running request to reach its next step once told to stop
        self._thread.join(timeout - grace)
        clean = not self._thread.is_alive()
        if not clean:
            self._abort.set()
            self._thread.join(grace)
            running = self.running
            if self._thread.is_alive() and running is not None:  # inside one long step: answer it now (503)
                self.metrics.requests.labels("unavailable").inc()
                running.set_exception(Unavailable(f"the server shut down: the running step did not end within "
                                                  f"limits.shutdown_timeout_s={timeout:g} s"))
        self._fail_queued(Unavailable("the server shut down before this request ran"))
        return clean

    @property
    def worker_alive(self) -> bool:
        """The worker is still inside a step (after a shutdown past its timeout: the process may exit)."""
        return self._thread is not None and self._thread.is_alive()

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
    def describe_plugins(self) -> list[dict[str, Any]]:
        """What a client may name in `plugins`: name, kind, configured scale (None when the
        config did not say), whether it takes a per-request image and whether it needs one."""
        out = []
        for name in sorted(self.plugins):
            spec = self.specs.get(name)
            out.append({"name": name, "kind": spec.kind if spec else _kind(self.plugins[name]),
                        "scale": spec.scale if spec else None, "takes_image": self.takes_image(name),
                        "needs_image": name in self.needs_image})
        return out

    def takes_image(self, name: str) -> bool:
        plugin = self.plugins.get(name)
        if isinstance(plugin, Served):
            return KINDS[plugin.kind].takes_image
        return hasattr(plugin, "with_image")

    def check(self, params: GenerationParams, plugins: list[str], images: dict[str, Any] | None = None,
              init_image: Any = None) -> GenerationParams:
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
        for name in ("height", "width", "height_sd15", "width_sd15"):  # both stages: SD1.5 is no cheaper per pixel
            v = getattr(params, name)
            if isinstance(v, int) and v > lim.max_side:
                raise ParameterError(name, v, f"at most {lim.max_side} pixels on this server (limits.max_side)")
        n = 1 if isinstance(params.prompt, str) else len(params.prompt or [])
        batch = params.num_images_per_prompt
        if isinstance(batch, int) and n * batch > lim.max_batch:
            raise ParameterError("num_images_per_prompt", batch,
                                 f"at most {lim.max_batch} images per request ({n} prompts x {batch})")
        images = images or {}
        self.check_plugins(plugins, list(images))
        for name in plugins:
            if name in self.needs_image and name not in images:
                raise ParameterError(f"images.{name}", None, f"an image: plugin {name} has no configured image")
        if params.seed is None:  # drawn here, not by the pipeline, so that the response can name it
            params = replace(params, seed=random.SystemRandom().randrange(MAX_SEED + 1))
        resolved = validate(params, self.rules)  # strength's own range first: -0.5 is strength's fault
        if init_image is None and resolved.strength != 1.0:
            raise ParameterError("init_image", None, f"an image: strength={resolved.strength} needs one")
        self.check_cost(resolved, n)
        return resolved

    def cost(self, params: GenerationParams, prompts: int = 1) -> int:
        """A resolved request's cost in pixel-steps: (SDXL pixels + SD1.5 pixels) x steps x images."""
        pixels = params.height * params.width + params.height_sd15 * params.width_sd15
        return pixels * params.num_inference_steps * params.num_images_per_prompt * prompts

    def check_cost(self, params: GenerationParams, prompts: int = 1) -> None:
        """Refuse, before it is queued, a request whose cost is over limits.max_pixel_steps."""
        cost, budget = self.cost(params, prompts), self.limits.max_pixel_steps
        if cost > budget:
            raise ParameterError(
                "height x width x num_inference_steps x num_images_per_prompt", f"<{cost} pixel-steps>",
                f"at most {budget} pixel-steps on this server (limits.max_pixel_steps): (height x width + "
                f"height_sd15 x width_sd15) = {params.height}x{params.width} + {params.height_sd15}x{params.width_sd15} "
                f"pixels x {params.num_inference_steps} steps x {params.num_images_per_prompt * prompts} images; "
                "ask fewer steps, images or pixels")

    def check_plugins(self, plugins: list[str], image_names: list[str]) -> None:
        """The plugin names of a request, and the names its images are sent under (cheap: no
        image is decoded); ParameterError naming the field."""
        for name in plugins:
            if not isinstance(name, str) or not PLUGIN_NAME.match(name) or ".." in name:
                raise ParameterError("plugins", name, "a configured plugin name (never a path)")
            if name not in self.plugins:
                known = ", ".join(sorted(self.plugins)) or "none configured"
                raise ParameterError("plugins", name, f"a configured plugin name: {known}")
        if len(set(plugins)) != len(plugins):
            raise ParameterError("plugins", plugins, "each plugin at most once")
        ip = [n for n in plugins if _installed(self.plugins[n])]
        if len(ip) > 1:
            raise ParameterError("plugins", plugins, f"at most one IP-Adapter per request (got {', '.join(ip)})")
        for name in image_names:
            if name not in plugins or not self.takes_image(name):
                takers = ", ".join(n for n in plugins if self.takes_image(n)) or "none in this request"
                raise ParameterError(f"images.{name}", "<image>",
                                     f"an image for a plugin named in this request that takes one: {takers}")

    def submit(self, params: GenerationParams, plugins: list[str] = (), timeout_s: float | None = None,
               images: dict[str, Any] | None = None, init_image: Any = None, preview: bool = False,
               key_id: str | None = None) -> Ticket:
        """Queue a request: `images` maps plugin names to their per-request images (PIL);
        `init_image` (PIL) starts from an image (img2img, with params.strength < 1); `preview`
        keeps every step's latents for ticket.progress's preview; `key_id`: whose request."""
        plugins = list(plugins)
        try:
            resolved = self.check(params, plugins, images, init_image)
        except ParameterError:
            self.metrics.requests.labels("invalid").inc()
            raise
        budget = self.limits.deadline_s if timeout_s is None else min(timeout_s, self.limits.deadline_s)
        job = Job(resolved, plugins, time.monotonic() + budget, dict(images or {}), init_image)
        job.future.progress = JobProgress(*expected_steps(resolved, init_image is not None),
                                          keep_latents=preview or self.previews, key_id=key_id)
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
        m, ticket = self.metrics, job.future
        started = time.monotonic()
        ticket.queue_seconds = started - job.enqueued
        m.stage_seconds.labels("queue").observe(ticket.queue_seconds)
        if not ticket.set_running_or_notify_cancel():
            return
        if ticket.abandoned.is_set():
            m.requests.labels("cancelled").inc()
            ticket.set_exception(Cancelled("abandoned while waiting in the queue"))
            return
        if started >= job.deadline:
            m.requests.labels("deadline").inc()
            ticket.set_exception(DeadlineExceeded("the deadline passed while the request waited in the queue"))
            return

        def step_callback(stage: str, i: int, steps: int) -> None:
            if self._abort.is_set():
                raise _Stop("shutdown")
            if progress is not None:
                progress.step(stage, i, steps)
            if ticket.abandoned.is_set():
                raise _Stop(f"{ticket.reason} during {stage} after step {i + 1} of {steps}")
            if time.monotonic() >= job.deadline:
                raise _Stop(f"deadline passed during {stage} after step {i + 1} of {steps}")

        progress = ticket.progress
        latents = {} if progress is None or not progress.keep_latents else {"callback_on_step_end": progress.on_step_end}
        if progress is not None:
            progress.begin()
        m.in_flight.set(1)
        self.running = ticket
        try:
            plugins = self._activate(job.plugins, job.images)
            out = self.pipeline.generate(job.params, plugins=plugins, step_callback=step_callback,
                                         init_image=job.init_image, **latents)
        except _Stop as e:
            outcome = ("unavailable" if self._abort.is_set() else
                       "cancelled" if ticket.abandoned.is_set() else "deadline")
            m.requests.labels(outcome).inc()
            error = {"unavailable": Unavailable, "cancelled": Cancelled, "deadline": DeadlineExceeded}[outcome]
            ticket.set_exception(error(str(e)))
        except ParameterError as e:
            m.requests.labels("invalid").inc()
            job.future.set_exception(e)
        except Exception as e:  # noqa: BLE001 -- reported as 500 (503 out of memory); the worker keeps serving
            # formatted here: a log record holding exc_info would keep the frames alive too
            log.error("generation failed\n%s", traceback.format_exc().rstrip())
            m.requests.labels("error").inc()
            # The traceback's frames hold the request's tensors; the future keeps the exception
            # until the client has read it, so without this nothing below could be freed.
            e.__traceback__ = None
            e.__context__ = e.__cause__ = None
            job.future.set_exception(e)
            del e
            _free_device_memory()
        else:
            for stage, seconds in getattr(out, "timings", {}).items():
                m.stage_seconds.labels(stage).observe(seconds)
            m.stage_seconds.labels("total").observe(time.monotonic() - job.enqueued)
            m.requests.labels("ok").inc()
            job.future.set_result(out)
        finally:
            ticket.run_seconds = time.monotonic() - started
            self.running = None
            m.in_flight.set(0)

    def _activate(self, names: list[str], images: dict[str, Any]) -> list[Any]:
        """LoRAs: the named ones at their scale, the others at 0 (unfused: free). IP-Adapters:
        the named one resumed, the others suspended. Step plugins: the named ones, on the
        request's image where it sent one."""
        step_plugins = []
        loras = {n: p.scale if n in names else 0.0 for n, p in self.plugins.items() if _kind(p) in LORA_KINDS}
        if loras:  # every configured LoRA stays active, at weight 0 unless named (unfused: free)
            self.pipeline.set_adapters(list(loras), list(loras.values()))
        for name, plugin in self.plugins.items():  # suspend first: one IP-Adapter active at a time
            if _installed(plugin) and name not in names:
                plugin.plugin.adapter.suspend()
        for name, plugin in self.plugins.items():
            if name in names and _kind(plugin) not in LORA_KINDS:
                if _installed(plugin):
                    plugin.plugin.adapter.resume()
                if isinstance(plugin, Served):
                    plugin = plugin.plugin
                step_plugins.append(plugin.with_image(images[name]) if name in images else plugin)
        return step_plugins


@dataclass(frozen=True)
class Served:
    """A configured plugin as Service.plugins holds it: its kind (plugin_kinds), its step
    plugin (None for a LoRA, held by the pipeline under the configured name) and the
    configured scale (a LoRA's weight when a request names it)."""

    kind: str
    plugin: Any
    scale: float


def _installed(plugin: Any) -> bool:
    """An IP-Adapter-like entry (PluginKind.installed): one active per request, suspended otherwise."""
    return isinstance(plugin, Served) and KINDS[plugin.kind].installed


def _kind(plugin: Any) -> str:
    """The plugin kind of a Served entry, else "step" (a bare step plugin)."""
    return plugin.kind if isinstance(plugin, Served) else "step"


# torch's CPU allocator reports a failed allocation as a plain RuntimeError with this text
_CPU_OOM = re.compile(r"DefaultCPUAllocator: (can't allocate memory|not enough memory)")


def is_out_of_memory(error: BaseException) -> bool:
    """torch's CUDA (and other devices') out-of-memory error, or the CPU allocator's, without
    importing torch here."""
    if any(t.__name__ == "OutOfMemoryError" for t in type(error).__mro__):
        return True
    return isinstance(error, (RuntimeError, MemoryError)) and (
        isinstance(error, MemoryError) or bool(_CPU_OOM.search(str(error))))


def _free_device_memory() -> None:
    """After a failed request: drop its tensors (the traceback held them) and hand the
    cached blocks back, so the next request starts from the resident models only."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_service(cfg: ServeConfig, warm: bool = True) -> Service:
    """Load the configured models and plugins (everything is read here, once, at start)."""
    import atexit

    import torch

    from ..pipeline import XAdapterPipeline
    from ..runtime.backends import open_backend
    from .config import DTYPES

    dtype = getattr(torch, DTYPES[cfg.dtype])
    if cfg.tiny:
        pipe = XAdapterPipeline.from_tiny(cfg.tiny_seed, device=cfg.device, dtype=dtype, progress=False)
    else:
        try:
            pipe = XAdapterPipeline.from_pretrained(cfg.sd15, cfg.sdxl, cfg.adapter, device=cfg.device, dtype=dtype,
                                                    progress=False)
        except (ParameterError, CheckpointError) as e:  # a path that is not the model its key says
            raise ConfigError(f"[models]: {e}") from None
    # the backend lives as long as the process (its temporary graphs go with it)
    backend = open_backend(cfg.backend.kind, pipe, onnx_dir=cfg.backend.onnx_dir, engine_dir=cfg.backend.engine_dir,
                           device=cfg.device, plugin_kinds=[s.kind for s in cfg.plugins.values()])
    atexit.register(backend.close)
    pipe = backend.pipeline
    plugins = load_plugins(cfg.plugins, pipe)
    rules = pipe.size_rules
    warmup = GenerationParams(prompt="warm-up", num_inference_steps=1, adapter_guidance_start=1.0,
                              height=rules.sdxl_multiple, width=rules.sdxl_multiple,
                              height_sd15=rules.sd15_multiple, width_sd15=rules.sd15_multiple, seed=0)
    needs_image = [n for n, s in cfg.plugins.items() if s.kind in IMAGE_KINDS and s.image is None]
    service = Service(pipe, cfg.limits, plugins, warmup=replace(warmup) if warm else None, needs_image=needs_image,
                      specs=cfg.plugins)
    service.model_name = model_name(cfg)
    return service


def model_name(cfg: ServeConfig) -> str:
    """The served model's name in the A1111 and OpenAI routes: the SDXL model's file or folder
    name with the SD1.5 one (no paths), or the tiny models' name."""
    import os

    if cfg.tiny:
        return f"xa-runtime-tiny-seed{cfg.tiny_seed}"
    base = [os.path.splitext(os.path.basename(os.path.normpath(p)))[0] for p in (cfg.sdxl, cfg.sd15)]
    return f"xa-{base[0]}+{base[1]}"


def load_plugins(specs: dict[str, PluginSpec], pipe: Any) -> dict[str, Served]:
    """The configured plugins, loaded by the pipeline's one loading path (pipe.load_plugins):
    LoRAs by name at weight 0 (unfused; set per request), the others with their configured
    image (read here); IP-Adapters suspended until a request names one."""
    from PIL import Image

    out: dict[str, Served] = {}
    for name, s in specs.items():
        try:
            if s.kind in LORA_KINDS:
                pipe.load_plugins([replace(s, scale=0.0, fused=False)])
                out[name] = Served(s.kind, None, s.scale)
                continue
            image = None
            if s.image is not None:
                with Image.open(s.image) as im:
                    image = im.convert("RGB")
            (plugin,) = pipe.load_plugins([replace(s, image=image)])
        except (ParameterError, CheckpointError, OSError) as e:  # the file is not this kind's model: the key's fault
            raise ConfigError(f"plugins.{name} (kind {s.kind!r}, path {s.path!r}): {e}") from None
        if s.row.installed:
            plugin.adapter.suspend()  # resumed for the requests naming it
        out[name] = Served(s.kind, plugin, s.scale)
    return out
