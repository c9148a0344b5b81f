"""Live progress of one request: the step it is at (both stages counted as one run), an ETA,
listeners told after every step (the SSE stream), and a cheap preview of the latents.

The preview is A1111's "Approx cheap": latents -> RGB by a fixed linear map per latent channel
(one 4 x 3 matrix per model family, no VAE), at the latents' size (1/8 of the image's side).
SD1.5's latents are shown during stage 1, SDXL's during stage 2. Latents are kept only for
requests that asked for a preview: asking for them makes stage 2 run one branch after the
other (the pipeline's callback_on_step_end), giving up the two-stream overlap.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from typing import Any, Callable

# Latent channel -> (R, G, B) contributions; the maps A1111's "Approx cheap" live preview uses
# (sd_vae_approx.cheap_approximation), themselves fitted by least squares on decoded images.
CHEAP_RGB = {
    "sd15": ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473)),
    "sdxl": ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163),
             (-0.3730, -0.2499, -0.2088)),
}
STAGE_FAMILY = {"stage1": "sd15", "stage2": "sdxl"}


def cheap_preview(latents: Any, family: str) -> Any:
    """1 x C x h x w latents (torch) -> an RGB PIL image of h x w by CHEAP_RGB[family]; latents
    with other than 4 channels (none of the real models) are shown as their channel mean."""
    import torch
    from PIL import Image

    lat = latents[0].detach().float().cpu()
    if lat.shape[0] == 4:
        rgb = torch.einsum("chw,cr->rhw", lat, torch.tensor(CHEAP_RGB[family]))
    else:
        rgb = lat.mean(0, keepdim=True).expand(3, -1, -1)
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(pixels, "RGB")


def png_base64(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class JobProgress:
    """Where one request is: updated by the worker thread after every step, read by the routes.

    `stage1_steps` and `stage2_steps` are the steps each stage will run (img2img runs a part of
    stage 1); the worker's step_callback calls step(), and, for requests with `keep_latents`,
    the pipeline's callback_on_step_end (on_step_end) hands over the latents of the step."""

    def __init__(self, stage1_steps: int, stage2_steps: int, keep_latents: bool = False, key_id: str | None = None):
        self.stage1_steps, self.stage2_steps = stage1_steps, stage2_steps
        self.keep_latents, self.key_id = keep_latents, key_id
        self.stage: str | None = None
        self.done_steps = 0
        self.started: float | None = None
        self.enqueued = time.time()
        self._latents: tuple[str, Any] | None = None
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._lock = threading.Lock()

    @property
    def total_steps(self) -> int:
        return self.stage1_steps + self.stage2_steps

    def listen(self, callback: Callable[[dict[str, Any]], None]) -> None:
        with self._lock:
            self._listeners.append(callback)

    def begin(self) -> None:
        self.started = time.monotonic()

    def step(self, stage: str, i: int, steps: int) -> None:
        """The worker finished step i (of `steps`) of `stage`."""
        if stage == "stage1":
            self.stage1_steps = steps
            self.done_steps = i + 1
        else:
            self.stage2_steps = steps
            self.done_steps = self.stage1_steps + i + 1
        self.stage = stage
        if not self.keep_latents:
            self._notify()

    def on_step_end(self, pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        """diffusers' callback_on_step_end (called after step()): keep this step's latents."""
        stage = tensors.get("stage", "stage1")
        self._latents = (STAGE_FAMILY.get(stage, "sdxl"), tensors["latents"][:1].detach().clone())
        self._notify()
        return {}

    def _notify(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        if listeners:
            snap = self.snapshot(preview=True)
            for callback in listeners:
                callback(snap)

    @property
    def fraction(self) -> float:
        return self.done_steps / self.total_steps if self.total_steps else 0.0

    def eta_seconds(self) -> float | None:
        """Seconds left at the rate of the steps run so far (None before the first step)."""
        if self.started is None or not self.done_steps:
            return None
        spent = time.monotonic() - self.started
        return spent / self.done_steps * max(0, self.total_steps - self.done_steps)

    def eta_relative(self) -> float:
        """A1111's eta_relative: seconds left, as its progress route estimates them (from the
        time since the job started and the fraction done)."""
        eta = self.eta_seconds()
        return 0.0 if eta is None else eta

    def preview_png(self) -> str | None:
        """The cheap preview of the last step's latents as base64 PNG (None: not kept, or no step yet)."""
        held = self._latents
        return None if held is None else png_base64(cheap_preview(held[1], held[0]))

    def snapshot(self, preview: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"stage": self.stage, "step": self.done_steps, "steps": self.total_steps,
                               "progress": round(self.fraction, 6), "eta_s": self.eta_seconds()}
        if preview and self.keep_latents:
            out["preview"] = self.preview_png()
        return out


def expected_steps(params: Any, img2img: bool) -> tuple[int, int]:
    """(stage-1 steps, stage-2 steps) a validated GenerationParams will run."""
    n = params.num_inference_steps
    return (int(n * params.strength) if img2img else n), params.stage2_steps
