"""The README's promises that code can check: its two opening commands, the CI script
running exactly the second, and a documented row for every `xa-generate` flag in the docs
(docs/parameters.md and the pages it links, besides the generated reference)."""

from pathlib import Path

from xa_runtime.cli.generate import build_parser

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0].startswith("# ") and lines[1] == "```sh" and lines[4] == "```", lines[:5]
    return lines[2:4]


def test_readme_opens_with_the_run_and_test_commands():
    run, test = readme_commands()
    assert run.startswith("pip install torch==") and "pip install -e . " in run and "xa-generate --prompt" in run
    assert test.startswith("pip install torch==") and 'pip install -e ".[test]"' in test
    assert test.endswith("python -m pytest -q")


def test_ci_runs_exactly_the_readme_test_command_last():
    script = (ROOT / ".ci" / "run").read_text().splitlines()
    assert script[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in script
    statements = [line for line in script if line.strip() and not line.lstrip().startswith("#")]
    assert statements[-1] == readme_commands()[1]  # last: its exit status is the script's


def test_every_cli_flag_is_documented():
    docs = "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    flags = [s for a in build_parser()._actions for s in a.option_strings if s.startswith("--")]
    missing = [f for f in flags if f not in ("--help", "--version") and f"`{f}" not in docs]
    assert not missing


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
