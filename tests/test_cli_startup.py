"""The five command-line tools answer --help, --version and a bad argument without importing
torch, diffusers or transformers: each is run in a fresh interpreter, and the modules loaded
when its main() returns are inspected there."""

import json
import os
import subprocess
import sys

import pytest

import xa_runtime

HEAVY = ("torch", "diffusers", "transformers")
# In-process seconds from importing the CLI module to main() returning. The real check is
# HEAVY: this bound only catches a gross regression (a busy 2-core machine needs ~0.2 s).
SECONDS = 2.0

# tool -> (module with main(argv), a bad command line ("{tmp}": a folder), text its error names)
CLIS = {
    "xa-generate": ("xa_runtime.cli.generate", ["--prompt", "a cat", "--output", "{tmp}/o.png", "--steps", "0"],
                    "--steps"),
    "xa-export": ("xa_runtime.cli.export", ["--tiny", "--output", "{tmp}/graphs", "--dtype", "bf16"], "--dtype"),
    "xa-build-engines": ("xa_runtime.cli.build_engines",
                         ["--tiny", "--onnx-dir", "{tmp}/onnx", "--output", "{tmp}/engines", "--precision", "fp64"],
                         "--precision"),
    "xa-bench": ("xa_runtime.cli.bench", ["--mode", "fastest"], "--mode"),
    "xa-serve": ("xa_runtime.cli.serve", ["--port", "eighty"], "--port"),
}

PROBE = """
import contextlib, io, json, sys, time
module, argv = sys.argv[1], sys.argv[2:]
started = time.perf_counter()
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        code = __import__(module, fromlist=["main"]).main(argv)
    except SystemExit as e:  # argparse's --help, --version and errors in the tools that let it exit
        code = e.code
seconds = time.perf_counter() - started
print(json.dumps({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "seconds": seconds,
                  "loaded": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def probe(module, argv):
    done = subprocess.run([sys.executable, "-c", PROBE, module, *argv], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_light(tool, what, result):
    print(f"{tool} {what}: exit {result['code']}, {result['seconds']:.2f} s")
    assert result["loaded"] == [], f"{tool} {what} imported {result['loaded']}"
    assert result["seconds"] < SECONDS, f"{tool} {what} took {result['seconds']:.2f} s"


@pytest.mark.parametrize("tool", list(CLIS))
def test_help_exits_0_without_torch(tool):
    result = probe(CLIS[tool][0], ["--help"])
    assert result["code"] in (0, None), result
    assert result["stdout"].startswith(f"usage: {tool}"), result
    check_light(tool, "--help", result)


@pytest.mark.parametrize("tool", list(CLIS))
def test_version_exits_0_without_torch(tool):
    result = probe(CLIS[tool][0], ["--version"])
    assert result["code"] in (0, None), result
    assert result["stdout"].strip() == f"{tool} {xa_runtime.__version__}", result
    check_light(tool, "--version", result)


@pytest.mark.parametrize("tool", list(CLIS))
def test_bad_argument_exits_2_with_an_error_line_without_torch(tool, tmp_path):
    module, argv, flag = CLIS[tool]
    result = probe(module, [a.format(tmp=tmp_path) for a in argv])
    assert result["code"] == 2, result
    errors = [line for line in result["stderr"].splitlines() if "error:" in line]
    assert len(errors) == 1 and flag in errors[0], result
    check_light(tool, "bad argument", result)
    assert list(tmp_path.iterdir()) == []  # nothing written
