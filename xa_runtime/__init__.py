"""xa-runtime: an inference runtime for X-Adapter (arXiv 2312.02238).

SD1.5 plugins act on SDXL through a frozen SD1.5 branch whose decoder features are
remapped into the SDXL decoder. `from xa_runtime import XAdapterPipeline` loads the
pipeline (and torch) on first use, so that importing the package stays cheap. Importing
it changes nothing in the process: weights and configs are read from local paths only
because every loader passes `local_files_only=True` (xa_runtime.loading), not through
environment variables.
"""

from __future__ import annotations

import lazy_loader

__version__ = "0.1.0"

# public name -> the module that defines it, imported when the name is first used (these need torch)
__getattr__, __dir__, _ = lazy_loader.attach(__name__, submod_attrs={
    "pipeline": ["XAdapterPipeline", "XAdapterOutput", "GenerationParams"],
})

__all__ = ["GenerationParams", "XAdapterOutput", "XAdapterPipeline", "__version__"]
