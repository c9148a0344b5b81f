"""The docs site (MkDocs, docs/ + mkdocs.yml) builds with --strict, and its examples run:
every Python block is executed on the tiny models in a fresh interpreter, except blocks
marked `<!-- example: needs ... -->` (real weights, a GPU, TensorRT), which are compiled;
every `xa-*` command line in a shell block is parsed by that tool's own parser, so a
documented flag that does not exist fails here. README.md's examples count as docs too."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
BLOCK = re.compile(r"(<!-- example: (?P<needs>[^>]*) -->\n)?```(?P<lang>\w*)[^\n]*\n(?P<code>.*?)```", re.S)
TOOLS = {"xa-generate": "xa_runtime.cli.generate", "xa-export": "xa_runtime.cli.export",
         "xa-build-engines": "xa_runtime.cli.build_engines", "xa-bench": "xa_runtime.cli.bench",
         "xa-serve": "xa_runtime.cli.serve", "xa-train": "xa_runtime.cli.train"}


def blocks(lang: str):
    for page in PAGES:
        for m in BLOCK.finditer(page.read_text()):
            if m.group("lang") == lang:
                yield pytest.param(m.group("code"), m.group("needs"), id=f"{page.relative_to(ROOT)}:{m.start()}")


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is in the [test] extra")
    env = {**os.environ, "DISABLE_MKDOCS_2_WARNING": "true", "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    for tool in TOOLS:
        assert f'id="{tool}"' in cli  # every tool's generated reference section


@pytest.mark.parametrize("code, needs", list(blocks("python")))
def test_python_example(tmp_path, code, needs):
    if needs:
        compile(code, "<docs example>", "exec")  # needs what this machine lacks: at least valid Python
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def command_lines(code: str):
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        for part in re.split(r"\s*&&\s*", line):
            words = shlex.split(part)
            if words and words[0] in TOOLS:
                yield words


@pytest.mark.parametrize("code, needs", list(blocks("sh")))
def test_shell_example_flags_exist(code, needs):
    import importlib

    for words in command_lines(code):
        parser = importlib.import_module(TOOLS[words[0]]).build_parser()
        try:
            parser.parse_args(words[1:])
        except SystemExit as e:  # argparse's own exit on an unknown flag or a bad choice
            raise AssertionError(f"{' '.join(words)}: the parser refuses it (exit {e.code})") from None
        except Exception as e:  # noqa: BLE001 -- a parser that raises (CheckedParser) instead of exiting
            if type(e).__name__ == "UsageError":
                raise AssertionError(f"{' '.join(words)}: {e}") from None
            raise
