"""AUTOMATIC1111's web UI API (/sdapi/v1/...) on xa-serve, as a translation onto the native
request (doors.py): the same validation, queue, deadlines and metrics as POST /v1/generate.

txt2img, img2img      A1111's body -> the native body; answer {images, parameters, info (a JSON
                      string)}. `<lora:NAME[:W]>` in the prompt names a configured LoRA (W: its
                      configured scale) and is removed from the encoded text; ControlNet units
                      (alwayson_scripts.controlnet.args, sd-webui-controlnet's API) name
                      configured ControlNets / T2I / Nexus adapters, module "none" only; the X-Adapter
                      knobs come through alwayson_scripts["x-adapter"].args[0] (XADAPTER_KNOBS).
                      Fields that would change the image and that xa-serve cannot honour are
                      refused (422 naming them); the other fields are accepted, and those not
                      used are listed in info["xa_ignored_fields"].
options               GET: the model and the few options that mean something here; POST: any
                      dict (Open WebUI posts the whole of it back); a checkpoint other than the
                      served model is 422
sd-models, samplers, schedulers, loras, scripts, and empty lists for what xa-serve has none of;
GET /internal/ping    A1111's probe
progress, interrupt   the request the worker runs now (your own, when keys are configured)
png-info              the A1111 infotext of a PNG and its other text chunks
Every other /sdapi/v1 path answers 404 naming what is implemented.
"""


import json
import math
import re
import time
from typing import Any

from ..infotext import A1111_SAMPLERS, infotext
from ..plugin_kinds import IMAGE_KINDS, KINDS, LORA_KINDS
from .doors import NativeDoor, Refused, base_size, jsonable, key_of

SAMPLERS = {a1111: ours for ours, a1111 in A1111_SAMPLERS.items()}
DEFAULTS = {"steps": 20, "width": 512, "height": 512, "cfg_scale": 7.0}  # A1111's, where a body leaves them out
XADAPTER_SCRIPT = "x-adapter"
CONTROLNET_SCRIPT = "ControlNet"  # sd-webui-controlnet's script title (matched without case, as A1111 does)
# the kinds a ControlNet unit may name: the step plugins that take a control image
CONTROL_KINDS = tuple(k for k in IMAGE_KINDS if not KINDS[k].installed)
# alwayson_scripts["x-adapter"].args[0] key -> native field (all optional: the native defaults)
XADAPTER_KNOBS = {"adapter_guidance_start": "adapter_guidance_start", "start": "adapter_guidance_start",
                  "adapter_condition_scale": "adapter_condition_scale", "condition_scale": "adapter_condition_scale",
                  "fusion_guidance_scale": "fusion_guidance_scale", "prompt_sd15": "prompt_sd15",
                  "width_sd15": "width_sd15", "height_sd15": "height_sd15"}
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")
# native field -> the A1111 field a client sent it as (for the `field` of errors)
A1111_NAMES = {"num_inference_steps": "steps", "guidance_scale": "cfg_scale", "num_images_per_prompt": "batch_size",
               "strength": "denoising_strength", "init_image": "init_images", "scheduler": "sampler_name"}
# Fields whose feature xa-serve does not have: refused when they ask for it (value -> refused?)
REFUSED = {
    "enable_hr": (lambda v: bool(v), "hires fix is not available: generate at the size you want (width, height)"),
    "restore_faces": (lambda v: bool(v), "face restoration is not available"),
    "tiling": (lambda v: bool(v), "tiling is not available"),
    "mask": (lambda v: bool(v), "inpainting (a mask) is not available; img2img without a mask is"),
    "script_name": (lambda v: bool(v), "scripts are not available (alwayson_scripts: controlnet, x-adapter)"),
    "subseed_strength": (lambda v: bool(v), "variation seeds are not available (subseed_strength 0)"),
}
# Fields that change nothing while the features above are off, or that are about saving files
NO_EFFECT = {
    "sampler_index", "scheduler", "batch_size", "n_iter", "subseed", "seed_resize_from_h", "seed_resize_from_w",
    "do_not_save_samples", "do_not_save_grid", "save_images", "send_images", "override_settings_restore_afterwards",
    "script_args", "styles", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y",
    "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt",
    "hr_additional_modules", "firstphase_width", "firstphase_height", "mask_blur", "mask_blur_x", "mask_blur_y",
    "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert", "include_init_images",
    "comments", "force_task_id", "infotext", "disable_extra_networks", "firstpass_image", "resize_mode",
    "denoising_strength",  # txt2img: hires fix's (img2img uses it)
}


def _refuse(field: str, message: str) -> Refused:
    return Refused(422, f"{field}: {message}", field)


def _lora_tags(prompt: str, loras: dict[str, float]) -> tuple[str, list[str]]:
    """`<lora:NAME[:W]>` tags -> (the prompt without them, the LoRA plugin names)."""
    names = []
    for m in LORA_TAG.finditer(prompt):
        name, weight = m.group(1).strip(), (m.group(2) or "").strip()
        if name not in loras:
            known = ", ".join(sorted(loras)) or "none configured"
            raise _refuse("prompt", f"<lora:{name}>: not a configured LoRA (GET /sdapi/v1/loras: {known})")
        if weight:
            try:
                w = float(weight)
            except ValueError:
                raise _refuse("prompt", f"<lora:{name}:{weight}>: the weight is not a number") from None
            if not math.isclose(w, loras[name], abs_tol=1e-6):
                raise _refuse("prompt", f"<lora:{name}:{weight}>: this server runs {name} at its configured scale "
                                        f"{loras[name]:g} only (write <lora:{name}> or <lora:{name}:{loras[name]:g}>)")
        if name not in names:
            names.append(name)
    return LORA_TAG.sub("", prompt).strip(), names


def _controlnet_units(args: Any, controls: dict[str, float], native: dict[str, Any]) -> None:
    """sd-webui-controlnet's units -> native plugins and images."""
    if not isinstance(args, list):
        raise _refuse("alwayson_scripts.controlnet.args", "a list of ControlNet units")
    for i, unit in enumerate(args):
        where = f"alwayson_scripts.controlnet.args[{i}]"
        if not isinstance(unit, dict):
            raise _refuse(where, "a ControlNet unit (a JSON object)")
        model = unit.get("model")
        if not unit.get("enabled", True) or model in (None, "", "None", "none"):
            continue
        name = re.sub(r"\s*\[[0-9a-fA-F]*\]$", "", str(model))  # "name [hash]" as the extension lists models
        if name not in controls:
            known = ", ".join(sorted(controls)) or "none configured"
            raise _refuse(f"{where}.model", f"{model!r} is not a configured ControlNet ({known})")
        module = unit.get("module")
        if module not in (None, "", "none", "None"):
            raise _refuse(f"{where}.module", f"preprocessor {module!r} is not run by xa-serve: send a ready control "
                                             "image with module \"none\"")
        weight = unit.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or not math.isclose(weight, controls[name], abs_tol=1e-6):
            raise _refuse(f"{where}.weight", f"{weight!r}: this server runs {name} at its configured scale "
                                             f"{controls[name]:g} only")
        if (unit.get("guidance_start", 0.0), unit.get("guidance_end", 1.0)) != (0.0, 1.0):
            raise _refuse(f"{where}.guidance_start", "guidance_start 0 and guidance_end 1 only (the configured "
                                                     "ControlNet acts on every step)")
        if unit.get("control_mode", "Balanced") not in ("Balanced", 0):
            raise _refuse(f"{where}.control_mode", f"{unit.get('control_mode')!r}: \"Balanced\" only")
        image = unit.get("image") or unit.get("input_image")
        if isinstance(image, dict):  # older units: {"image": ..., "mask": ...}
            image = image.get("image")
        if name in native.setdefault("plugins", []):
            raise _refuse(f"{where}.model", f"{name} twice: one unit per ControlNet")
        native["plugins"].append(name)
        if image:
            native.setdefault("images", {})[name] = image


def translate(body: dict[str, Any], img2img: bool, door: NativeDoor) -> tuple[dict[str, Any], list[str]]:
    """An A1111 txt2img / img2img body -> (the native body, the A1111 fields not used)."""
    service, rules = door.service, door.service.rules
    used = {"prompt", "negative_prompt", "seed", "sampler_name", "steps", "cfg_scale", "width", "height",
            "override_settings", "alwayson_scripts"}
    for field, (asks, why) in REFUSED.items():
        if asks(body.get(field)):
            raise _refuse(field, why)
    kinds = {d["name"]: (d["kind"], d["scale"] if d["scale"] is not None else 1.0) for d in service.describe_plugins()}
    loras = {n: s for n, (k, s) in kinds.items() if k in LORA_KINDS}
    controls = {n: s for n, (k, s) in kinds.items() if k in CONTROL_KINDS}
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise _refuse("prompt", "a string")
    text, lora_names = _lora_tags(prompt, loras)
    native: dict[str, Any] = {"prompt": text, "plugins": list(lora_names)}
    negative = body.get("negative_prompt")
    if negative:  # "" (what clients send for none): no negative prompt, as the native API
        native["negative_prompt"] = negative
    seed = body.get("seed", -1)
    if seed is not None and seed != -1:
        native["seed"] = seed
    sampler = body.get("sampler_name") or body.get("sampler_index")
    if sampler:
        if sampler not in SAMPLERS and sampler not in A1111_SAMPLERS:
            raise _refuse("sampler_name", f"{sampler!r}: one of {', '.join(SAMPLERS)}")
        native["scheduler"] = SAMPLERS.get(sampler, sampler)
    scheduler = body.get("scheduler")
    if scheduler not in (None, "", "automatic", "Automatic"):
        raise _refuse("scheduler", f"{scheduler!r}: \"automatic\" only (the sampler's own timesteps)")
    batch = body.get("batch_size", 1)
    n_iter = body.get("n_iter", 1)
    if batch != 1 or n_iter != 1:
        native["num_images_per_prompt"] = batch * n_iter if isinstance(batch, int) and isinstance(n_iter, int) else batch
    native["num_inference_steps"] = body.get("steps", DEFAULTS["steps"])
    native["guidance_scale"] = body.get("cfg_scale", DEFAULTS["cfg_scale"])
    native["width"] = body.get("width", DEFAULTS["width"])
    native["height"] = body.get("height", DEFAULTS["height"])
    if img2img:
        used |= {"init_images", "denoising_strength"}
        init = body.get("init_images")
        if not isinstance(init, list) or not init:
            raise _refuse("init_images", "a list of one base64 image")
        if len(init) > 1:
            raise _refuse("init_images", f"one image (got {len(init)}); send one request per image")
        native["init_image"] = init[0]
        native["strength"] = body.get("denoising_strength", 0.75)
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise _refuse("override_settings", "a JSON object")
    check_checkpoint(overrides.get("sd_model_checkpoint"), door, "override_settings.sd_model_checkpoint")
    ignored = [f"override_settings.{k}" for k in overrides if k != "sd_model_checkpoint"]
    scripts = body.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        raise _refuse("alwayson_scripts", "a JSON object")
    for script, value in scripts.items():
        args = value.get("args", []) if isinstance(value, dict) else value
        key = script.lower()
        if key == CONTROLNET_SCRIPT.lower():
            _controlnet_units(args, controls, native)
        elif key in (XADAPTER_SCRIPT, "xadapter", "x_adapter"):
            knobs = args[0] if isinstance(args, list) and args else args
            if not isinstance(knobs, dict):
                raise _refuse(f"alwayson_scripts.{script}.args", "[{knob: value}] with knobs " + ", ".join(XADAPTER_KNOBS))
            for k, v in knobs.items():
                if k not in XADAPTER_KNOBS:
                    raise _refuse(f"alwayson_scripts.{script}.args[0].{k}", "unknown knob; known: " + ", ".join(XADAPTER_KNOBS))
                native[XADAPTER_KNOBS[k]] = v
        elif args in ([], [False], None, {}):  # clients send disabled scripts (webuiapi: ADetailer [False])
            ignored.append(f"alwayson_scripts.{script}")
        else:
            raise _refuse(f"alwayson_scripts.{script}", f"script {script!r} is not available here "
                                                        f"(alwayson scripts: controlnet, {XADAPTER_SCRIPT})")
    if "width_sd15" not in native and "height_sd15" not in native:
        native.update(base_size(native["width"], native["height"], rules))
    native["plugins"] = native.get("plugins", [])
    ignored += sorted(k for k in body if k not in used and k not in NO_EFFECT and k not in REFUSED)
    return native, ignored


def check_checkpoint(name: Any, door: NativeDoor, field: str) -> None:
    if name is None:
        return
    bare = re.sub(r"\s*\[[0-9a-fA-F]*\]$", "", str(name))
    if bare != door.model_name:
        raise Refused(422, f"{field}: checkpoint {name!r} is not served here; this server holds {door.model_name!r} "
                           "only (GET /sdapi/v1/sd-models)", field)


def _info(body: dict[str, Any], done: Any, ignored: list[str], door: NativeDoor) -> dict[str, Any]:
    """A1111's `info` (decoded): what the request ran with."""
    p = done.params
    n = len(done.output.images)
    texts = [infotext(p, 0, door.model_name) for _ in range(n)]
    extra = {k: p.get(k) for k in ("adapter_guidance_start", "adapter_condition_scale", "fusion_guidance_scale",
                                   "width_sd15", "height_sd15", "prompt_sd15")}
    return {
        "prompt": body.get("prompt", ""), "all_prompts": [body.get("prompt", "")] * n,
        "negative_prompt": body.get("negative_prompt") or "", "all_negative_prompts": [body.get("negative_prompt") or ""] * n,
        "seed": p["seed"], "all_seeds": [p["seed"]] * n, "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
        "width": p["width"], "height": p["height"], "sampler_name": A1111_SAMPLERS.get(p["scheduler"], p["scheduler"]),
        "cfg_scale": p["guidance_scale"], "steps": p["num_inference_steps"], "batch_size": n, "restore_faces": False,
        "sd_model_name": door.model_name, "sd_model_hash": None, "denoising_strength": p["strength"] if p["strength"] != 1 else None,
        "extra_generation_params": {"X-Adapter": extra, "plugins": done.req.plugins}, "index_of_first_image": 0,
        "infotexts": texts, "styles": body.get("styles") or [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1, "is_using_inpainting_conditioning": False, "version": "xa-serve",
        "xa_parameters": jsonable(p), "xa_ignored_fields": ignored,
    }


def register(app: Any, door: NativeDoor) -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse

    service = door.service
    options: dict[str, Any] = {}  # what clients posted to /options (echoed by GET)
    gate = app.state.gate

    def a1111_error(e: Refused, native: bool = False) -> Any:
        """A1111's error body; `native`: the field is a native name (the door refused it)."""
        field = A1111_NAMES.get(e.field, e.field) if e.field and native else e.field
        body = {"error": type(e).__name__ if e.status >= 500 else "Refused", "detail": str(e), "field": field}
        headers = None if e.retry_after is None else {"Retry-After": str(e.retry_after)}
        return JSONResponse(body, status_code=e.status, headers=headers)

    async def generate(request: Request, img2img: bool):
        try:
            body = await door.read(request)
            native, ignored = translate(body, img2img, door)
        except Refused as e:
            return a1111_error(e)
        try:
            done = await door.run(request, native)
        except Refused as e:
            return a1111_error(e, native=True)
        images = done.images_base64() if body.get("send_images", True) else []
        echoed = {k: v for k, v in body.items() if k != "auth"}  # SillyTavern sends its user:pass in the body
        return {"images": images, "parameters": echoed, "info": json.dumps(_info(body, done, ignored, door))}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await generate(request, img2img=False)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await generate(request, img2img=True)

    def own(request: Request, ticket: Any) -> bool:
        """Whether the caller may see / stop this request: anyone without keys, else its key's."""
        return ticket is not None and (not gate.cfg.enabled or ticket.progress.key_id == key_of(request))

    @app.get("/sdapi/v1/progress")
    def progress(request: Request, skip_current_image: bool = False):
        ticket = service.running
        queued = service.queue_depth
        if not own(request, ticket):
            return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None, "current_task": None,
                    "state": {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                              "job_count": queued + (ticket is not None), "job_timestamp": "0", "job_no": 0,
                              "sampling_step": 0, "sampling_steps": 0}}
        p = ticket.progress
        image = None if skip_current_image else p.preview_png()
        return {"progress": p.fraction, "eta_relative": p.eta_relative(), "current_image": image,
                "textinfo": f"{p.stage or 'starting'}: step {p.done_steps} of {p.total_steps}", "current_task": None,
                "state": {"skipped": False, "interrupted": ticket.reason == "interrupted", "stopping_generation": False,
                          "job": "xa-serve", "job_count": queued + 1,
                          "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(p.enqueued)),
                          "job_no": 0, "sampling_step": p.done_steps, "sampling_steps": p.total_steps}}

    @app.post("/sdapi/v1/interrupt")
    def interrupt(request: Request):
        ticket = service.running
        if own(request, ticket):
            ticket.abandon("interrupted")
            return {"interrupted": True}
        return {"interrupted": False}

    def current_options() -> dict[str, Any]:
        return {**options, "sd_model_checkpoint": door.model_name, "sd_checkpoint_hash": None,
                "samples_format": "png", "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic",
                "live_previews_enable": service.previews, "show_progress_every_n_steps": 1,
                "live_previews_image_format": "png", "show_progress_type": "Approx cheap"}

    @app.get("/sdapi/v1/options")
    def get_options():
        return current_options()

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        try:
            body = await door.read(request)
            check_checkpoint(body.get("sd_model_checkpoint"), door, "sd_model_checkpoint")
        except Refused as e:
            return a1111_error(e)
        applied = []
        if "live_previews_enable" in body:
            service.previews = bool(body["live_previews_enable"])
            applied.append("live_previews_enable")
        fixed = set(current_options()) - set(options)
        options.update({k: v for k, v in body.items() if k not in fixed})
        return {"applied": applied + (["sd_model_checkpoint"] if "sd_model_checkpoint" in body else []),
                "ignored": sorted(k for k in body if k not in applied and k != "sd_model_checkpoint")}

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        return [{"title": door.model_name, "model_name": door.model_name, "hash": None, "sha256": None,
                 "filename": door.model_name, "config": None}]

    @app.get("/sdapi/v1/samplers")
    def samplers():
        return [{"name": a, "aliases": [ours], "options": {}} for a, ours in SAMPLERS.items()]

    @app.get("/sdapi/v1/schedulers")
    def schedulers():
        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                 "need_inner_model": False}]

    @app.get("/sdapi/v1/loras")
    def loras():
        return [{"name": d["name"], "alias": d["name"], "path": d["name"], "metadata": {},
                 "xa_branch": KINDS[d["kind"]].branch, "xa_scale": d["scale"]}
                for d in service.describe_plugins() if d["kind"] in LORA_KINDS]

    @app.get("/sdapi/v1/scripts")
    def scripts():
        names = [XADAPTER_SCRIPT] + ([CONTROLNET_SCRIPT.lower()] if any(d["kind"] in CONTROL_KINDS
                                                            for d in service.describe_plugins()) else [])
        return {"txt2img": names, "img2img": names}

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: Request):
        try:
            body = await door.read(request)
            image = door.open_image("image", body.get("image") if isinstance(body.get("image"), str) else "")
            chunks = dict(getattr(image, "text", {}) or {})
        except Refused as e:
            return a1111_error(e)
        record = chunks.get("xa_runtime")
        try:
            parameters = json.loads(record) if record else {}
        except ValueError:
            parameters = {}
        return {"info": chunks.pop("parameters", ""), "items": chunks, "parameters": parameters}

    for path in ("upscalers", "latent-upscale-modes", "sd-vae", "prompt-styles", "hypernetworks", "face-restorers",
                 "realesrgan-models", "sd-modules"):
        app.add_api_route(f"/sdapi/v1/{path}", lambda: [], methods=["GET"])
    app.add_api_route("/internal/ping", lambda: {}, methods=["GET"])  # A1111's liveness probe (behind the key)
    app.add_api_route("/sdapi/v1/embeddings", lambda: {"loaded": {}, "skipped": {}}, methods=["GET"])
    for path in ("refresh-checkpoints", "refresh-loras", "refresh-vae"):
        app.add_api_route(f"/sdapi/v1/{path}", lambda: None, methods=["POST"])

    implemented = sorted({r.path.removeprefix("/sdapi/v1/") for r in app.routes if r.path.startswith("/sdapi/v1/")})

    @app.api_route("/sdapi/v1/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    def not_implemented(rest: str):
        return JSONResponse({"error": "NotImplemented", "detail": f"/sdapi/v1/{rest} of the A1111 API is not "
                             f"implemented by xa-serve (implemented: {', '.join(implemented)})"}, status_code=404)
