"""The benchmark scripts (benchmarks/*.py are scripts, not a package), loaded as modules
so that tests can call their main()."""

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# The scripts import their sibling modules by name (kernels_static.py: kernels_aot), as
# they do when run as scripts; appended, so nothing installed is shadowed.
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))


def load_script(name: str):
    """benchmarks/<name>.py as a fresh module."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
