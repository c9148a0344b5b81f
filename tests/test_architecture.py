"""The layering is a contract a machine checks (pyproject.toml [tool.importlinter]): imports
point down the layers of the README's "Layout", TensorRT's package is imported only by the
tensorrt backend and xa-build-engines, fixture writers only by the benchmark library, inside
the plugins : export : engines layer engines build on export and export on plugins, the
pipeline imports no kernel (the runtime hands it the hooks), and no module cycles. Also checked: a wrong-way import really breaks the contract."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = shutil.which("lint-imports") or pytest.skip("import-linter is not installed (the [test] extra has it)",
                                                   allow_module_level=True)


def lint(package_parent: Path) -> subprocess.CompletedProcess:
    """lint-imports over the xa_runtime package found in `package_parent` (it puts its working
    directory first on sys.path, so it runs there), with this repository's contracts."""
    env = {"PYTHONPATH": str(package_parent), "PATH": str(Path(sys.executable).parent)}
    return subprocess.run([LINT, "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")], cwd=package_parent, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 6 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("models/mapping.py", "from ..pipeline import params as _wrong_way", "Layers: imports point down"),
    ("pipeline/params.py", "from ..engines import manifest as _not_here", "TensorRT (engines) only behind"),
    ("plugins/lora.py", "from ..testing import lora as _fixture", "Test fixture writers are not production code"),
    ("graphs.py", "import xa_runtime.runtime as _torch_above", "Layers: imports point down"),
    ("serve/app.py", "from ..cli import usage as _entry_point", "Layers: imports point down"),
    ("plugins/lora.py", "from ..export import manifest as _up_in_layer", "Inside plugins : export : engines"),
    ("export/manifest.py", "from ..engines import refit as _up_in_layer", "Inside plugins : export : engines"),
    ("pipeline/xadapter.py", "from ..kernels import shapes as _kernel", "Pipeline does not import kernels"),
])
def test_a_wrong_way_import_breaks_a_contract(tmp_path, module, line, contract):
    shutil.copytree(ROOT / "xa_runtime", tmp_path / "xa_runtime", ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "xa_runtime" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    broken = [ln for ln in result.stdout.splitlines() if ln.endswith(" BROKEN")]
    assert any(ln.startswith(contract) for ln in broken), result.stdout[-3000:]
