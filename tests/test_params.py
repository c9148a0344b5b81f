"""Every bad parameter gets a ParameterError naming it, before any model is touched."""

import math

import pytest

from xa_runtime.errors import ParameterError
from xa_runtime.pipeline import GenerationParams, SizeRules, validate

BAD = [
    ("num_inference_steps", dict(num_inference_steps=0)),
    ("num_inference_steps", dict(num_inference_steps=1001)),
    ("num_inference_steps", dict(num_inference_steps=2.5)),
    ("guidance_scale", dict(guidance_scale=math.nan)),
    ("guidance_scale", dict(guidance_scale=-1.0)),
    ("guidance_scale", dict(guidance_scale=math.inf)),
    ("adapter_guidance_start", dict(adapter_guidance_start=0.0)),
    ("adapter_guidance_start", dict(adapter_guidance_start=1.5)),
    ("adapter_guidance_start", dict(adapter_guidance_start=0.4, num_inference_steps=2)),  # int(0.8) = 0 steps
    ("adapter_condition_scale", dict(adapter_condition_scale=-0.1)),
    ("adapter_condition_scale", dict(adapter_condition_scale=math.inf)),
    ("fusion_guidance_scale", dict(fusion_guidance_scale=1.5)),
    ("fusion_guidance_scale", dict(fusion_guidance_scale=math.nan)),
    ("height", dict(height=1000)),
    ("width", dict(width=0)),
    ("width", dict(width=8192)),
    ("height_sd15", dict(height_sd15=500)),
    ("width_sd15", dict(width_sd15=4096)),
    ("num_images_per_prompt", dict(num_images_per_prompt=0)),
    ("num_images_per_prompt", dict(prompt=["a"] * 8, num_images_per_prompt=9)),
    ("prompt", dict(prompt=[])),
    ("prompt", dict(prompt=["a", 3])),
    ("prompt_sd15", dict(prompt=["a", "b"], prompt_sd15=["a"])),
    ("negative_prompt", dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"])),
    ("scheduler", dict(scheduler="heun")),
    ("seed", dict(seed=-1)),
    ("output_type", dict(output_type="jpeg")),
]


@pytest.mark.parametrize("name, kwargs", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_parameter_is_named(name, kwargs):
    params = GenerationParams(**({"prompt": "a cat"} | kwargs))
    with pytest.raises(ParameterError) as info:
        validate(params)
    assert info.value.name == name
    assert name in str(info.value)


def test_defaults_resolve_to_model_sizes():
    p = validate(GenerationParams(prompt="a cat"))
    assert (p.height, p.width, p.height_sd15, p.width_sd15) == (1024, 1024, 512, 512)
    assert p.num_inference_steps == 50 and p.guidance_scale == 7.5 and p.adapter_guidance_start == 0.9
    tiny = validate(GenerationParams(prompt="a cat"), SizeRules(sd15_default=64, sdxl_default=128))
    assert (tiny.height, tiny.height_sd15) == (128, 64)


def test_stage2_steps():
    assert GenerationParams(prompt="x", num_inference_steps=30, adapter_guidance_start=0.9).stage2_steps == 27
    assert GenerationParams(prompt="x", num_inference_steps=50, adapter_guidance_start=1.0).stage2_steps == 50


def test_error_message_says_what_is_accepted():
    with pytest.raises(ParameterError, match=r"a multiple of 32 in \[32, 4096\] pixels"):
        validate(GenerationParams(prompt="a", height=1000))


def test_each_rows_json_schema_accepts_what_its_check_accepts():
    """The HTTP door's schema and the Python door's check come from one row: at and around
    every bound they agree (jsonschema as the independent reader of the schema)."""
    from jsonschema import Draft202012Validator

    from xa_runtime.pipeline.params import CHOICE, PAIR, PARAMETERS, SIDE, TEXT

    for p in PARAMETERS:
        if p.kind in (TEXT, PAIR):  # PAIR: Python only, no schema door (tests/test_diffusers_habits.py checks it)
            continue
        schema = p.json_schema()
        schema["type"] = "string" if p.kind == CHOICE else "number"
        lo, hi = p.bounds()
        if p.kind == CHOICE:
            values = [*p.choices, "nope"]
        else:
            middle = lo + (hi - lo) // 2 if p.kind in ("int", SIDE) else (lo + hi) / 2
            values = [lo, hi, lo - 1, hi + 1, lo + 0.5, middle]
        if p.kind == SIDE:
            values += [2 * lo, 2 * lo + 1]
        for value in values:
            try:
                p.check(value)
                checked = True
            except ParameterError as e:
                assert e.name == p.name and str(value) in str(e)
                checked = False
            schema_ok = Draft202012Validator(schema).is_valid(value) and (p.kind not in ("int", SIDE)
                                                                         or float(value).is_integer())
            assert checked == schema_ok, (p.name, value)


def test_every_field_of_generation_params_is_a_row():
    import dataclasses

    from xa_runtime.pipeline.params import PARAMETERS

    names = [f.name for f in dataclasses.fields(GenerationParams)]
    assert names == [p.name for p in PARAMETERS] + ["extra"]
    defaults = {f.name: f.default for f in dataclasses.fields(GenerationParams)}
    assert [defaults[n] for n in ("num_inference_steps", "guidance_scale", "adapter_guidance_start")] == [50, 7.5, 0.9]


def test_the_sd15_size_follows_the_sdxl_aspect():
    """validate() picks the SD1.5 size for the pipeline, xa-generate and xa-serve alike: the
    method's 1:2 scale on SD1.5's 64 px grid where it keeps the aspect within 5%, else the
    smallest size with that aspect; a given size of another aspect warns what the hand-over does."""
    import warnings

    from xa_runtime.errors import AspectWarning
    from xa_runtime.pipeline.params import sd15_size

    tiny = SizeRules(sd15_default=64, sdxl_default=128)
    assert sd15_size(1024, 1024) == (512, 512) and sd15_size(832, 1216) == (448, 640)
    assert sd15_size(1216, 832) == (640, 448) and sd15_size(768, 1344) == (384, 704)
    assert sd15_size(128, 128, tiny) == (64, 64) and sd15_size(192, 256, tiny) == (192, 256)
    assert sd15_size(832, 1216, height_sd15=512) == (512, 768)  # one side given: the other follows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolved = validate(GenerationParams(prompt="a", height=832, width=1216))
    assert (resolved.height_sd15, resolved.width_sd15) == (448, 640)
    with pytest.warns(AspectWarning, match=r"512x512 .* stretched 1\.46x horizontally.* 640x448"):
        validate(GenerationParams(prompt="a", height=832, width=1216, height_sd15=512, width_sd15=512))


def test_xa_generate_takes_the_same_sd15_size(tmp_path, capsys):
    import json

    from xa_runtime.cli.generate import main

    out = tmp_path / "wide.png"
    assert main(["--prompt", "a", "--steps", "1", "--adapter-guidance-start", "1", "--width", "256", "--height", "192",
                 "--no-progress", "--output", str(out)]) == 0
    parameters = json.loads(out.with_suffix(".json").read_text())["parameters"]
    assert (parameters["width_sd15"], parameters["height_sd15"]) == (256, 192)
    assert main(["--prompt", "a", "--steps", "1", "--adapter-guidance-start", "1", "--width", "256", "--height", "192",
                 "--width-sd15", "64", "--height-sd15", "64", "--no-progress", "--output", str(out)]) == 0
    assert capsys.readouterr().err.count("warning: SD1.5 size 64x64") == 1  # one line, said once
