"""diffusers' habits, tried on the X-Adapter pipeline as a diffusers user writes them: each one
either works (checked against diffusers' own behaviour where diffusers is the reference: the
same callback calls and latents as diffusers' StableDiffusionPipeline for stage 1, the same
interrupt step, diffusers' callback objects) or fails at once with an error that names the
argument and says what to do instead. No habit may fail badly (a TypeError from deep inside,
a setting silently ignored). `test_habit_count` prints the tally (tried / work / clear error).
"""

import copy
import pickle

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from diffusers.callbacks import IPAdapterScaleCutoffCallback, MultiPipelineCallbacks, SDCFGCutoffCallback, SDXLCFGCutoffCallback

from xa_runtime.errors import AspectWarning, ParameterError
from xa_runtime.pipeline import XAdapterPipeline
from xa_runtime.pipeline.schedulers import make_scheduler
from xa_runtime.testing.lora import write_random_lora

# 2 stage-1 steps, 1 stage-2 step, 64 x 64 (SD1.5 at its smallest, 64 x 64, too): the cheapest run
RUN = dict(num_inference_steps=2, adapter_guidance_start=0.5, height=64, width=64)
STEPS4 = {**RUN, "num_inference_steps": 4}  # callbacks: 4 stage-1 steps, 2 stage-2 steps
HABITS: dict[str, str] = {}  # habit -> "work" | "error"


def habit(expected):
    def register(fn):
        HABITS[fn.__name__] = expected
        return fn
    return register


@pytest.fixture(scope="module")
def pipe():
    p = XAdapterPipeline.from_tiny(0, progress=False)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    return pipe.save_pretrained(tmp_path_factory.mktemp("saved") / "xa")


def gen(seed=3):
    return torch.Generator().manual_seed(seed)


def run(pipe, **kw):
    return pipe("a cat", **{**RUN, "output_type": "np", **kw}).images


_PLAIN: dict[int, np.ndarray] = {}


def plain(pipe, seed=3):
    """The tiny pipeline's image for a generator of `seed`, with nothing else set (computed once)."""
    if seed not in _PLAIN:
        _PLAIN[seed] = run(pipe, generator=gen(seed))
    return _PLAIN[seed]


def fresh(pipe):
    """A pipeline of its own to change (a copy: the modules are not shared)."""
    return copy.deepcopy(pipe)


def refused(exc_name, fn, *words):
    """The error names the argument and what to do (its words)."""
    with pytest.raises((ParameterError, AttributeError)) as info:
        fn()
    text = str(info.value)
    assert exc_name in text and all(w in text for w in words), text


# ---------------------------------------------------------------- loading and placement
@habit("work")
def from_pretrained_folder_auto_dtype_safetensors(pipe, saved):
    loaded = XAdapterPipeline.from_pretrained(saved, torch_dtype="auto", use_safetensors=True)
    assert loaded.dtype == torch.float32  # as saved
    assert np.array_equal(run(loaded, generator=gen()), plain(pipe))


@habit("work")
def torch_dtype_string(pipe, saved):
    assert XAdapterPipeline.from_tiny(0, torch_dtype="bfloat16", progress=False).dtype == torch.bfloat16


@habit("error")
def torch_dtype_bad(pipe, saved):
    refused("torch_dtype", lambda: XAdapterPipeline.from_pretrained(saved, torch_dtype="int8"), "float16")


@habit("error")
def variant_fp16(pipe, saved):
    refused("variant", lambda: XAdapterPipeline.from_pretrained(saved, variant="fp16"), "torch_dtype")


@habit("error")
def from_pretrained_unknown_keyword(pipe, saved):
    refused("low_cpu_mem_usage", lambda: XAdapterPipeline.from_pretrained(saved, low_cpu_mem_usage=True),
            "from_pretrained")


@habit("work")
def to_device_and_dtype_string(pipe, saved):
    p = fresh(pipe)
    assert p.to("cpu", dtype="bfloat16").dtype == torch.bfloat16 and p.to(torch.float32).dtype == torch.float32


@habit("work")
def components(pipe, saved):
    c = pipe.components
    assert c["sdxl_unet"] is pipe.sdxl.unet and c["sd15_vae"] is pipe.sd15.vae and c["mapping"] is pipe.mapping


@habit("error")
def single_unet_attribute(pipe, saved):
    refused("unet", lambda: pipe.unet, "pipe.sdxl.unet")


@habit("error")
def set_single_unet(pipe, saved):
    refused("unet", lambda: setattr(pipe, "unet", pipe.sdxl.unet), "pipe.sdxl.unet")


@habit("work")
def swap_in_compiled_unet(pipe, saved):
    p = fresh(pipe)
    p.sdxl.unet = torch.compile(p.sdxl.unet, backend="eager")
    assert np.array_equal(run(p, generator=gen()), plain(pipe))
    assert p.sdxl_branch.unet is p.sdxl.unet  # the compiled module is what runs


@habit("work")
def swap_in_other_unet(pipe, saved):
    p = fresh(pipe)
    other = copy.deepcopy(p.sdxl.unet)
    with torch.no_grad():
        other.conv_out.bias.add_(0.5)
    p.sdxl.unet = other
    assert not np.array_equal(run(p, generator=gen()), plain(pipe))  # used, not silently ignored


@habit("work")
def pickle_pipeline(pipe, saved):
    plain(pipe)  # after a call: transformers' hooks are on the text encoders by then
    again = pickle.loads(pickle.dumps(pipe))
    assert np.array_equal(run(again, generator=gen()), plain(pipe))


@habit("work")
def cpu_offload_and_vae_slicing(pipe, saved):
    p = fresh(pipe)
    p.enable_model_cpu_offload()  # no GPU: nothing moves
    p.enable_vae_slicing()
    p.enable_vae_tiling()
    assert run(p, generator=gen()).shape == (1, 64, 64, 3)


# ---------------------------------------------------------------- call arguments
@habit("work")
def generator_one(pipe, saved):
    assert np.array_equal(plain(pipe, 5), run(pipe, seed=5))


@habit("work")
def generator_list(pipe, saved):
    both = run(pipe, generator=[gen(5), gen(6)], num_images_per_prompt=2)
    np.testing.assert_allclose(both[0], plain(pipe, 5)[0], atol=1e-5)  # batched UNet numerics
    np.testing.assert_allclose(both[1], plain(pipe, 6)[0], atol=1e-5)


@habit("error")
def generator_list_wrong_length(pipe, saved):
    refused("generator", lambda: run(pipe, generator=[gen(5)], num_images_per_prompt=2), "one per image")


@habit("error")
def generator_and_seed(pipe, saved):
    refused("seed", lambda: run(pipe, generator=gen(), seed=1), "generator")


@habit("work")
def return_dict_false_and_output_types(pipe, saved):
    (images,) = pipe("a cat", **RUN, return_dict=False)
    assert images[0].size == (64, 64)
    assert run(pipe, output_type="pt").shape == (1, 3, 64, 64) and run(pipe, output_type="latent").shape[1] == 4


@habit("work")
def prompt_list_and_batch(pipe, saved):
    assert len(pipe(["a", "b"], **RUN, num_images_per_prompt=2, negative_prompt=["x", "y"]).images) == 4


@habit("work")
def prompt_2(pipe, saved):
    same = run(pipe, generator=gen(), prompt_2="a cat")
    assert np.array_equal(same, plain(pipe))  # prompt_2 defaults to the prompt
    assert not np.array_equal(run(pipe, generator=gen(), prompt_2="a dog", negative_prompt_2="x"), same)


@habit("work")
def clip_skip(pipe, saved):
    assert not np.array_equal(run(pipe, generator=gen(), clip_skip=1), plain(pipe))


@habit("error")
def clip_skip_too_deep(pipe, saved):
    refused("clip_skip", lambda: run(pipe, clip_skip=10), "at most")


@habit("work")
def guidance_rescale(pipe, saved):
    assert not np.array_equal(run(pipe, generator=gen(), guidance_rescale=0.7), plain(pipe))


@habit("work")
def size_conditioning(pipe, saved):
    assert np.array_equal(run(pipe, generator=gen(), original_size=(64, 64), target_size=(64, 64),
                              crops_coords_top_left=(0, 0)), plain(pipe))  # diffusers' defaults
    assert not np.array_equal(run(pipe, generator=gen(), original_size=(512, 512), crops_coords_top_left=(8, 0)),
                              plain(pipe))


@habit("error")
def size_conditioning_bad(pipe, saved):
    refused("crops_coords_top_left", lambda: run(pipe, crops_coords_top_left=(1,)), "two integers")


@habit("work")
def image_with_strength_is_img2img(pipe, saved):
    start = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    assert np.array_equal(run(pipe, generator=gen(), image=start, strength=0.5),
                          run(pipe, generator=gen(), init_image=start, strength=0.5))


@habit("error")
def image_without_controlnet_or_strength(pipe, saved):
    refused("image", lambda: run(pipe, image=np.zeros((64, 64, 3), np.float32)), "strength", "init_image")


@habit("error")
def cross_attention_kwargs_scale(pipe, saved):
    refused("cross_attention_kwargs", lambda: run(pipe, cross_attention_kwargs={"scale": 0.5}), "set_adapters")


@habit("error")
def denoising_end(pipe, saved):
    refused("denoising_end", lambda: run(pipe, denoising_end=0.8), "adapter_guidance_start")


@habit("work")
def scheduler_from_config(pipe, saved):
    p = fresh(pipe)
    p.scheduler = EulerDiscreteScheduler.from_config(p.scheduler.config)
    assert np.array_equal(run(p, generator=gen()), run(pipe, generator=gen(), scheduler="euler"))


@habit("work")
def non_square_size(pipe, saved):
    out = pipe("a cat", **{**RUN, "height": 192, "width": 256}, output_type="np")
    assert out.images.shape == (1, 192, 256, 3) and (out.params.height_sd15, out.params.width_sd15) == (192, 256)


@habit("work")
def non_square_sd15_size_given_warns(pipe, saved):
    with pytest.warns(AspectWarning, match="stretched"):
        run(pipe, height=192, width=128, height_sd15=64, width_sd15=64)


@habit("work")
def lora_load_and_switch(pipe, saved, tmp_path_factory):
    p = fresh(pipe)
    path = write_random_lora(tmp_path_factory.mktemp("lora") / "style.safetensors", p.sd15.unet, p.sd15.text_encoder,
                             std=0.2)
    p.load_lora_weights(path, adapter_name="style", adapter_weight=0.5)
    styled = run(p, generator=gen())
    assert p.get_active_adapters() == ["style"] and not np.array_equal(styled, plain(pipe))
    p.disable_lora()  # diffusers' switch: off, still loaded
    assert p.get_active_adapters() == [] and np.array_equal(run(p, generator=gen()), plain(pipe))
    p.enable_lora()  # back at its weight
    assert p.get_active_adapters() == ["style"] and np.array_equal(run(p, generator=gen()), styled)
    p.fuse_lora()
    refused("disable_lora", p.disable_lora, "unfuse_lora")
    p.unload_lora_weights()
    assert np.array_equal(run(p, generator=gen()), plain(pipe))


# ---------------------------------------------------------------- callbacks, interrupt, against diffusers
def diffusers_sd15(pipe):
    """diffusers' own StableDiffusionPipeline on the pipeline's SD1.5 modules and stage-1 sampler."""
    return StableDiffusionPipeline(vae=pipe.sd15.vae, text_encoder=pipe.sd15.text_encoder, tokenizer=pipe.sd15.tokenizer,
                                   unet=pipe.sd15.unet, scheduler=make_scheduler("dpmpp-2m", pipe.sd15.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def recorder(calls, stop_at=None, on="stage1"):
    def callback(p, i, t, kw):
        calls.append((kw.get("stage", "stage1"), i, int(t), kw["latents"].clone(), p.num_timesteps,
                      p.do_classifier_free_guidance))
        if stop_at is not None and i == stop_at and kw.get("stage", "stage1") == on:
            p._interrupt = True
        return {}
    return callback


@habit("work")
def callback_on_step_end_like_diffusers(pipe, saved):
    ours, theirs = [], []
    pipe("a cat", **STEPS4, generator=gen(), callback_on_step_end=recorder(ours))
    diffusers_sd15(pipe)("a cat", num_inference_steps=4, height=64, width=64, generator=gen(), output_type="latent",
                         callback_on_step_end=recorder(theirs))
    stage1 = [c for c in ours if c[0] == "stage1"]
    assert [(i, t, n) for _, i, t, _, n, _ in stage1] == [(i, t, n) for _, i, t, _, n, _ in theirs]
    for a, b in zip(stage1, theirs):
        torch.testing.assert_close(a[3], b[3], rtol=1e-5, atol=1e-5)  # the same latents as diffusers' SD1.5
    assert [(s, i, n) for s, i, _, _, n, _ in ours if s == "stage2"] == [("stage2", 0, 2), ("stage2", 1, 2)]


@habit("work")
def interrupt_like_diffusers(pipe, saved):
    ours, theirs = [], []
    out = pipe("a cat", **STEPS4, generator=gen(), output_type="np", callback_on_step_end=recorder(ours, stop_at=1))
    diffusers_sd15(pipe)("a cat", num_inference_steps=4, height=64, width=64, generator=gen(), output_type="latent",
                         callback_on_step_end=recorder(theirs, stop_at=1))
    assert [(s, i) for s, i, *_ in ours] == [("stage1", 0), ("stage1", 1)] and len(theirs) == 2  # same step
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()
    later = []
    run(pipe, **STEPS4, callback_on_step_end=recorder(later, stop_at=0, on="stage2"))
    assert [(s, i) for s, i, *_ in later] == [("stage1", i) for i in range(4)] + [("stage2", 0)]
    assert len(run(pipe)) == 1 and pipe.interrupt is False  # reset by the next call


@habit("work")
def diffusers_cfg_cutoff_callback(pipe, saved):
    ours, theirs = [], []
    cut = SDCFGCutoffCallback(cutoff_step_ratio=0.5)
    both = MultiPipelineCallbacks([cut, RecordAll(ours)])
    pipe("a cat", **STEPS4, generator=gen(), callback_on_step_end=both)
    diffusers_sd15(pipe)("a cat", num_inference_steps=4, height=64, width=64, generator=gen(), output_type="latent",
                         callback_on_step_end=MultiPipelineCallbacks([SDCFGCutoffCallback(cutoff_step_ratio=0.5),
                                                                      RecordAll(theirs)]))
    stage1 = [c for c in ours if c[0] == "stage1"]
    assert [c[-1] for c in stage1] == [c[-1] for c in theirs] == [True, True, False, False]
    for a, b in zip(stage1, theirs):
        torch.testing.assert_close(a[3], b[3], rtol=1e-5, atol=1e-5)
    assert pipe.guidance_scale == 0.0 and not pipe.do_classifier_free_guidance


@habit("work")
def diffusers_sdxl_cfg_cutoff_and_ip_cutoff(pipe, saved):
    cb = MultiPipelineCallbacks([SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1), IPAdapterScaleCutoffCallback()])
    out = pipe("a cat", **RUN, generator=gen(), output_type="np", callback_on_step_end=cb)
    assert np.isfinite(out.images).all() and not np.array_equal(out.images, plain(pipe))


@habit("error")
def callback_unknown_tensor(pipe, saved):
    refused("callback_on_step_end_tensor_inputs",
            lambda: run(pipe, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"]),
            "latents")


class RecordAll:
    """A diffusers-style callback object (tensor_inputs + __call__) that records the calls."""

    tensor_inputs = ["latents"]

    def __init__(self, calls):
        self.calls = calls

    def __call__(self, p, i, t, kw):
        self.calls.append((kw.get("stage", "stage1"), i, int(t), kw["latents"].clone(), p.num_timesteps,
                           p.do_classifier_free_guidance))
        return kw


@pytest.mark.parametrize("name", list(HABITS))
def test_habit(name, pipe, saved, tmp_path_factory):
    fn = globals()[name]
    if "tmp_path_factory" in fn.__code__.co_varnames[:fn.__code__.co_argcount]:
        fn(pipe, saved, tmp_path_factory)
    else:
        fn(pipe, saved)


def test_habit_count(capsys):
    work = sum(v == "work" for v in HABITS.values())
    error = sum(v == "error" for v in HABITS.values())
    with capsys.disabled():
        print(f"\ndiffusers habits: {len(HABITS)} tried, {work} work, {error} clear error, 0 bad "
              "(a bad one fails its test_habit)")
    assert work + error == len(HABITS) and len(HABITS) >= 38  # every habit classified; none dropped unnoticed
