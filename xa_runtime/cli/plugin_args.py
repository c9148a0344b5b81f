"""`xa-generate` flags for SD1.5 plugins and the stage-1 init image: parsed, checked before
any model is loaded (paths exist, flag groups pair up, scales in range) into
plugin_kinds.PluginSpec values, which XAdapterPipeline.load_plugins loads once the pipeline
is loaded."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from ..errors import ParameterError
from ..plugin_kinds import KIND_NAMES, KINDS, PLUGIN_KINDS, PluginSpec

CONTROL_TYPES = ("none", "canny")
GENERIC_KINDS = tuple(row for row in PLUGIN_KINDS if row.cli_generic)
GENERIC_PATH_FLAGS = {row.flags[0]: row for row in GENERIC_KINDS}


def add_plugin_arguments(ap: argparse.ArgumentParser) -> None:
    lora = ap.add_argument_group("LoRA")
    lora.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                      help="an SD1.5 LoRA (kohya or diffusers/PEFT) on the SD1.5 branch; repeatable")
    lora.add_argument("--sdxl-lora", action="append", default=[], metavar="PATH[:SCALE]",
                      help="an SDXL LoRA on the SDXL branch, alongside; repeatable")
    lora.add_argument("--lora-mode", choices=["fused", "unfused"], default="fused",
                      help="fused into the weights (fastest per step, default) or unfused (fastest to switch)")
    g = ap.add_argument_group("SD1.5 plugins (repeat a group for several; per-plugin flags pair up by position)")
    g.add_argument("--controlnet", action="append", default=[], metavar="PATH", help="ControlNet folder or single file")
    g.add_argument("--control-image", action="append", default=[], metavar="IMG", help="its control image")
    g.add_argument("--control-type", action="append", default=[], choices=CONTROL_TYPES,
                   help="canny: edge map made from the image; none: the image is the map (default)")
    g.add_argument("--controlnet-scale", action="append", default=[], type=float, metavar="F",
                   help="its conditioning scale (default 1.0)")
    g.add_argument("--control-start", action="append", default=[], type=float, metavar="F",
                   help="fraction of the steps where it starts (default 0.0)")
    g.add_argument("--control-end", action="append", default=[], type=float, metavar="F",
                   help="fraction of the steps where it ends (default 1.0)")
    g.add_argument("--guess-mode", action="store_true", help="ControlNet guess mode (all ControlNets)")
    g.add_argument("--t2i-adapter", action="append", default=[], metavar="PATH", help="T2I-Adapter diffusers folder")
    g.add_argument("--t2i-image", action="append", default=[], metavar="IMG", help="its control image")
    g.add_argument("--t2i-scale", action="append", default=[], type=float, metavar="F",
                   help="its feature scale (default 1.0)")
    g.add_argument("--t2i-factor", action="append", default=[], type=float, metavar="F",
                   help="fraction of each stage's steps with the adapter (default 1.0)")
    for row in GENERIC_KINDS:  # kinds whose flags come from their table row alone
        path_flag, image_flag, scale_flag = row.flags
        g.add_argument(path_flag, action="append", default=[], metavar="PATH", help=row.description)
        g.add_argument(image_flag, action="append", default=[], metavar="IMG", help="its control image")
        g.add_argument(scale_flag, action="append", default=[], type=float, metavar="F",
                       help="its feature scale (default 1.0)")
    g.add_argument("--ip-adapter", metavar="PATH", help="IP-Adapter (ip-adapter_sd15 layout, plain or plus)")
    g.add_argument("--ip-image", action="append", default=[], metavar="IMG", help="its image(s)")
    g.add_argument("--ip-scale", type=float, default=None, metavar="F",
                   help="scale of the image prompt (default 1.0)")
    g.add_argument("--image-encoder", metavar="DIR",
                   help="CLIP vision encoder folder (default: image_encoder/ beside the IP-Adapter or one level up)")
    g.add_argument("--init-image", metavar="IMG", help="stage 1 starts from this image (img2img / ControlNet-tile)")
    g.add_argument("--strength", type=float, default=1.0, metavar="F",
                   help="with --init-image: fraction of stage 1 that runs, (0, 1] (default 1.0)")


def _exists(flag: str, path: str | None) -> None:
    from ..loading.checkpoint_files import non_regular_kind

    if path is not None and not Path(path).exists():
        raise ParameterError(flag, path, "an existing file or folder")
    kind = non_regular_kind(path) if path is not None else None
    if kind is not None and kind != "a folder":
        raise ParameterError(flag, path, f"an existing file or folder; this is {kind}")


def _image(flag: str, path: str) -> None:
    """An image file PIL can decode, its declared size within loading.images' bounds (pixels
    and aspect ratio, checked from the header before decoding, so a decompression bomb is
    never expanded)."""
    from ..loading.checkpoint_files import non_regular_kind
    from ..loading.images import read_image

    kind = non_regular_kind(path)
    if not Path(path).is_file() or kind is not None:
        raise ParameterError(flag, path, "an existing image file (PNG, JPEG, ...)" + (f"; this is {kind}" if kind else ""))
    read_image(path, flag)  # decodes every pixel: a corrupt stream fails here, before the models load


def _plugin_model(flag: str, path: str) -> None:
    """The plugin model path is of the kind its flag loads, from config.json / the file name only."""
    from ..loading.checkpoint_files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, read_folder_config

    _exists(flag, path)
    p = Path(path)
    if flag == "--controlnet":
        accepted = "a local SD1.5 ControlNet: a diffusers folder or a control_*.safetensors/.pth file"
        if p.is_dir():
            read_folder_config(p, flag, accepted, "ControlNetModel")
        elif p.suffix.lower() not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
            raise ParameterError(flag, path, f"{accepted}; unknown suffix {p.suffix!r}")
    elif flag == "--t2i-adapter":
        read_folder_config(p, flag, "a local diffusers T2IAdapter folder (config.json + weights)", "T2IAdapter")
    elif flag in GENERIC_PATH_FLAGS:
        read_folder_config(p, flag, f"a local {GENERIC_PATH_FLAGS[flag].description} (config.json + weights)")
    elif flag == "--ip-adapter":
        from ..plugins.ip_adapter_loading import IP_ADAPTER_SUFFIXES

        if not p.is_file() or p.suffix not in IP_ADAPTER_SUFFIXES:
            raise ParameterError(flag, path, f"an IP-Adapter file ending in {', '.join(IP_ADAPTER_SUFFIXES)}")
    elif flag == "--image-encoder":
        read_folder_config(p, flag, "a CLIP vision encoder folder (config.json + weights)")


def _ip_adapter_file(path: str, image_encoder: str | None) -> None:
    """The IP-Adapter file reads as weights only (a hostile pickle is refused here, naming
    --ip-adapter), and without --image-encoder its default encoder folder exists."""
    from ..loading.checkpoint_files import PICKLE_SUFFIXES, check_weights_only
    from ..plugins.ip_adapter import default_image_encoder_path

    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        check_weights_only(path)
    if image_encoder is None and default_image_encoder_path(path) is None:
        raise ParameterError("--ip-adapter", path, "an IP-Adapter file with its CLIP vision encoder in image_encoder/ "
                                                   "beside it or one level up, or give --image-encoder DIR")


def _paired(args: argparse.Namespace, main: str, flag: str, default: Any) -> list[Any]:
    """Values of `flag` for each `main` plugin: none given (default), one (for all) or one each."""
    n = len(getattr(args, main.lstrip("-").replace("-", "_")))
    values = getattr(args, flag.lstrip("-").replace("-", "_"))
    if values and not n:
        raise ParameterError(flag, values[0], f"only together with {main}")
    if len(values) in (0, 1):
        return [values[0] if values else default] * n
    if len(values) != n:
        raise ParameterError(flag, values, f"one value, or one per {main} ({n})")
    return list(values)


def _scale(flag: str, value: float, lo: float, hi: float) -> None:
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ParameterError(flag, value, f"a finite number in [{lo}, {hi}]")


def check_plugin_arguments(args: argparse.Namespace) -> list[PluginSpec]:
    """Plugin specs from the flags, every path and value checked; nothing loaded."""
    from ..plugins.lora import parse_lora_argument

    specs: list[PluginSpec] = []
    for flag, kind in (("--lora", "lora"), ("--sdxl-lora", "sdxl_lora")):
        for i, text in enumerate(getattr(args, kind)):
            path, scale = parse_lora_argument(text)
            _exists(flag, path)
            _scale(flag, scale, -10.0, 10.0)
            specs.append(PluginSpec(f"{kind}{i}:{path}", kind, path, scale, fused=args.lora_mode == "fused"))
    for main, image_flag, kind in (("--controlnet", "--control-image", "controlnet"),
                                   ("--t2i-adapter", "--t2i-image", "t2i"),
                                   *((row.flags[0], row.flags[1], row.name) for row in GENERIC_KINDS)):
        paths = getattr(args, main.lstrip("-").replace("-", "_"))
        images = getattr(args, image_flag.lstrip("-").replace("-", "_"))
        if paths and len(images) != len(paths):
            raise ParameterError(image_flag, images, f"one image per {main} ({len(paths)})")
        if images and not paths:
            raise ParameterError(image_flag, images[0], f"only together with {main}")
        for p, im in zip(paths, images):
            _plugin_model(main, p)
            _image(image_flag, im)
        if kind == "controlnet":
            rows = zip(paths, images, _paired(args, main, "--control-type", "none"),
                       _paired(args, main, "--controlnet-scale", 1.0), _paired(args, main, "--control-start", 0.0),
                       _paired(args, main, "--control-end", 1.0))
            for p, im, ctype, scale, start, end in rows:
                _scale("--controlnet-scale", scale, 0.0, 10.0)
                _scale("--control-start", start, 0.0, 1.0)
                _scale("--control-end", end, 0.0, 1.0)
                if start >= end:
                    raise ParameterError("--control-start", start, f"less than --control-end ({end})")
                specs.append(PluginSpec(None, kind, p, scale, im, control_type=ctype, guidance_start=start,
                                        guidance_end=end, guess_mode=args.guess_mode))
        elif kind == "t2i":
            for p, im, scale, factor in zip(paths, images, _paired(args, main, "--t2i-scale", 1.0),
                                            _paired(args, main, "--t2i-factor", 1.0)):
                _scale("--t2i-scale", scale, 0.0, 10.0)
                _scale("--t2i-factor", factor, 0.0, 1.0)
                specs.append(PluginSpec(None, kind, p, scale, im, conditioning_factor=factor))
        else:
            scale_flag = KINDS[kind].flags[2]
            for p, im, scale in zip(paths, images, _paired(args, main, scale_flag, 1.0)):
                _scale(scale_flag, scale, 0.0, 10.0)
                specs.append(PluginSpec(None, kind, p, scale, im))
    if args.ip_adapter:
        _plugin_model("--ip-adapter", args.ip_adapter)
        ip_scale = 1.0 if args.ip_scale is None else args.ip_scale
        if not args.ip_image:
            raise ParameterError("--ip-image", None, "at least one image with --ip-adapter")
        for im in args.ip_image:
            _image("--ip-image", im)
        if args.image_encoder is not None:
            _plugin_model("--image-encoder", args.image_encoder)
        _scale("--ip-scale", ip_scale, 0.0, 10.0)
        ip_images = tuple(args.ip_image) if len(args.ip_image) > 1 else args.ip_image[0]
        specs.append(PluginSpec(None, "ip_adapter", args.ip_adapter, ip_scale, ip_images,
                                image_encoder=args.image_encoder))
    elif args.ip_image or args.image_encoder or args.ip_scale is not None:
        flag, value = next((f, v) for f, v in (("--ip-image", args.ip_image), ("--image-encoder", args.image_encoder),
                                                ("--ip-scale", args.ip_scale)) if v)
        raise ParameterError(flag, value[0] if isinstance(value, list) else value, "only together with --ip-adapter")
    if args.init_image is not None:
        _image("--init-image", args.init_image)
    elif args.strength != 1.0:
        raise ParameterError("--strength", args.strength, "1.0 unless --init-image is given")
    return specs


def check_plugin_files(specs: list[PluginSpec]) -> dict[str, Any]:
    """The reads that check_plugin_arguments leaves for last (they read whole files, still
    before any model loads): each LoRA parsed and checked (ranks, alpha, finite factors), the
    IP-Adapter file read weights-only and its image encoder found. Returns the LoraWeights
    read, by path, for XAdapterPipeline.load_plugins(specs, loras=...)."""
    from ..plugins.lora import load_lora

    loras = {s.path: load_lora(s.path) for s in specs if s.row.branch is not None}
    for s in specs:
        if s.kind == "ip_adapter":
            _ip_adapter_file(s.path, s.image_encoder)
    return loras


def plugin_record(specs: list[PluginSpec]) -> dict[str, list[dict[str, Any]]]:
    """The sidecar's "plugins": kind -> what each spec of that kind recorded."""
    return {kind: [s.record() for s in specs if s.kind == kind] for kind in KIND_NAMES}


def load_init_image(path: str | None) -> Any:
    if path is None:
        return None
    from ..loading.images import read_image

    return read_image(path, "--init-image")  # EXIF orientation applied, 16-bit grey scaled
