"""benchmarks/soak_serve.py --smoke end to end: a real xa-serve process on loopback with the
tiny models, a few seconds of load. The figures mean nothing; the script's own checks
(every request answered once, no 5xx, memory back within 10%) and its files are tested."""

import json

import pytest
from bench_scripts import load_script

pytest.importorskip("httpx")


def test_soak_serve_smoke_answers_every_request_once(tmp_path):
    out = tmp_path / "soak.json"
    assert load_script("soak_serve").main(["--smoke", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    c = result["summary"]["counts"]
    assert c["requests"] >= 2 and c["lost"] == 0 and c["5xx"] == 0
    assert c["requests"] == c["200"] + c["429"] + c["4xx"] + c["5xx"] + c["other"] + c["lost"]
    assert c["bad_sent"] >= 1 and c["bad_answered_4xx"] == c["bad_sent"]
    mem = result["memory"]
    assert mem["baseline_bytes"] > 0 and mem["after_over_baseline"] <= 1.10
    assert result["server_exit_code"] == 0 and result["passed"]
    assert "| requests | 200 | 429 |" in out.with_suffix(".md").read_text()


def test_soak_serve_refuses_a_bad_output_folder_before_starting(tmp_path, capsys):
    assert load_script("soak_serve").main(["--smoke", "--output", str(tmp_path / "no" / "x.json")]) == 2
    assert "--output" in capsys.readouterr().err


def test_percentile_is_nearest_rank():
    soak = load_script("soak_serve")
    values = [float(v) for v in range(1, 101)]
    assert soak.percentile(values, 50) == 50.0 and soak.percentile(values, 99) == 99.0
    assert soak.percentile([3.0], 99) == 3.0 and soak.percentile([], 50) is None
