"""Training the X-Adapter mapping layers for a model pair, as the paper did (`xa-train`).

`options` (no torch) holds every setting and its range; `data` reads webdataset shards or
an image folder into aspect-ratio buckets; `step` is the method's training step; `loop`
runs it on accelerate (DDP, mixed precision, checkpoints, resume, validation);
`checkpoint` writes checkpoints and the final adapter in the released key layout.
"""

from __future__ import annotations

import lazy_loader

from .options import TrainOptions, check_options

__getattr__, _, _ = lazy_loader.attach(__name__, submod_attrs={
    "loop": ["TrainModels", "TrainResult", "train"],
    "step": ["XAdapterTrainingStep", "TrainableMapping", "zero_initialised_mapping"],
    "data": ["DataError", "DataStats"],
})

__all__ = [
    "DataError",
    "DataStats",
    "TrainModels",
    "TrainOptions",
    "TrainResult",
    "TrainableMapping",
    "XAdapterTrainingStep",
    "check_options",
    "train",
    "zero_initialised_mapping",
]
