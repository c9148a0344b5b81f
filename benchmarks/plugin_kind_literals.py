"""Counts the modules of xa_runtime that spell a plugin kind as a string literal outside the
plugin-kind table (plugin_kinds.py), plugins/ and testing/: the measure of how many places a
new plugin kind would have to be taught. `python benchmarks/plugin_kind_literals.py [ROOT]`
prints one module a line and the count; tests/test_plugin_kinds.py asserts the set."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# every spelling a plugin kind has had (names and aliases, today's and main's)
KIND_SPELLINGS = frozenset({"lora", "sdxl_lora", "controlnet", "t2i", "t2i_adapter", "nexus", "nexus_adapter",
                            "ip", "ip_adapter"})
ALLOWED = ("plugin_kinds.py", "plugins/", "testing/")


def modules_naming_kinds(root: Path) -> dict[str, list[str]]:
    """module path (relative to the package root) -> the kind literals it spells."""
    out: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(ALLOWED[1:]) or rel == ALLOWED[0]:
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        found = sorted({n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in docstrings
                        and isinstance(n.value, str) and n.value in KIND_SPELLINGS})
        if found:
            out[rel] = found
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "xa_runtime"
    found = modules_naming_kinds(root)
    for rel, kinds in found.items():
        print(f"{rel}: {', '.join(kinds)}")
    print(len(found))
