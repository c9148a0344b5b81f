"""Facts the docs state that once drifted from the code, checked against the code: what importing
xa_runtime does to the environment, the test suite's time (stated once, included elsewhere), and
docs/parameters.md's table against PARAMETERS (one row per flag, the defaults and choices)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from xa_runtime.pipeline.params import OUTPUT_TYPES, PARAMETERS, REQUIRED, SAME as SAME_DEFAULT

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]


def test_import_leaves_the_environment_as_the_docs_say():
    code = "import json, os; before = dict(os.environ); import xa_runtime, xa_runtime.pipeline; " \
           "print(json.dumps({k: v for k, v in os.environ.items() if before.get(k) != v}))"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out) == {}
    claims = [p.name for p in PAGES if re.search(r"import\w*\s+`?xa_runtime`?\s+sets", p.read_text())]
    assert claims == [], f"these pages say importing xa_runtime sets something: {claims}"


def test_suite_time_is_stated_once():
    stated = [(p.relative_to(ROOT), m.group(0)) for p in PAGES
              for m in re.finditer(r"\d+\s*(?:minutes|min)\b[^.\n]{0,20}2 (?:CPU )?cores", p.read_text())]
    assert len(stated) == 1 and str(stated[0][0]) == "README.md", stated
    assert '--8<-- "README.md:suite-time"' in (ROOT / "docs" / "getting-started.md").read_text()


def _table() -> list[list[str]]:
    text = (ROOT / "docs" / "parameters.md").read_text()
    table = text[text.index("| flag | Python name"):].split("\n\n")[0]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in table.splitlines()[2:]]


def test_parameter_table_matches_parameters():
    rows = _table()
    flags = [re.findall(r"`(--[a-z0-9-]+)", r[0]) for r in rows]
    seen = [f for fs in flags for f in fs]
    assert len(seen) == len(set(seen)), f"a flag in two rows: {sorted(f for f in seen if seen.count(f) > 1)}"
    for p in PARAMETERS:
        if p.flag is None:
            continue
        row = next((r for r, fs in zip(rows, flags) if p.flag in fs), None)
        assert row is not None, f"{p.flag} has no row"
        assert f"`{p.name}`" in row[1], (p.name, row)
        default = p.cli_default if p.cli_default is not SAME_DEFAULT else p.default
        if isinstance(p.default, (int, float)) and not isinstance(p.default, bool):
            assert re.search(rf"(?<![\d.]){re.escape(str(p.default))}(?![\d.])", row[2]), (p.name, p.default, row[2])
        if default is REQUIRED:
            assert row[2] == "required", (p.name, row[2])
        for choice in p.choices:
            assert f"`{choice}`" in row[3], (p.name, choice, row[3])
    python_only = (ROOT / "docs" / "parameters.md").read_text().split("Python only:")[1].split("\n\n")[0]
    for output_type in OUTPUT_TYPES:
        assert f'`"{output_type}"`' in python_only, output_type


