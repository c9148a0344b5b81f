"""The kernels' full-size shapes: SDXL at 1024 px and SD1.5 at 512 px, batch 2 (the CFG
rows). Shared by benchmarks/bench_kernels.py (timings on a GPU) and
benchmarks/kernels_aot.py (compiled for a GPU architecture without one)."""

from __future__ import annotations

BATCH = 2  # [uncond; cond]

REMAP_SITES = [  # (name, C, H, W): zero_out.k input/output channels and grid at SDXL 1024 px
    ("r0 mid", 1280, 32, 32),
    ("r1 up0", 1280, 64, 64),
    ("r2 up1", 640, 128, 128),
]

MAPPING_STAGES = [  # (name, C, H, W): a residual block of each mapping stage at SDXL 1024 px
    ("stage0", 1280, 32, 32),
    ("stage1", 1280, 64, 64),
    ("stage2", 640, 128, 128),
]

GROUP_NORM_SHAPES = [  # (name, C, H, W): GroupNorm inputs of the UNets at SDXL 1024 / SD1.5 512 px, 32 groups
    ("sdxl 320ch 128^2", 320, 128, 128),
    ("sdxl 640ch 64^2", 640, 64, 64),
    ("sdxl 1280ch 32^2", 1280, 32, 32),
    ("sd15 320ch 64^2", 320, 64, 64),
]

GEGLU_SHAPES = [  # (name, tokens, D): the feed-forward GEGLU input is tokens x 2D, per image row
    ("sdxl 64^2 D=2560", 4096, 2560),
    ("sdxl 32^2 D=5120", 1024, 5120),
    ("sd15 64^2 D=1280", 4096, 1280),
]

LATENT = 128  # the sampler step's latent side (SDXL 1024 px): 1 x 4 x 128 x 128
