"""xa-serve's config refused at start: one line naming the key, exit 2, never a traceback
(non-finite and fractional limits, missing files and images, a file that is not its kind's
model, a device this build has not, a file that is not UTF-8, unsafe plugin names, scales
out of range, ports out of range); a Hypothesis property test over the TOML document."""

import math

import pytest

pytest.importorskip("fastapi")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from xa_runtime.cli import serve as serve_cli  # noqa: E402
from xa_runtime.serve.config import ConfigError, Limits, check_at_start, load_config  # noqa: E402


def start(tmp_path, capsys, text, argv=()):
    """xa-serve's exit code and stderr for a config `text` (bytes or str), stopped before any
    model is loaded by the check under test (a config that passes would start: not wanted here)."""
    path = tmp_path / "serve.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    (tmp_path / "lora.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    try:
        rc = serve_cli.main(["--config", str(path), *argv])
    except SystemExit as e:  # argparse's own exit
        rc = e.code
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize("text, key", [
    ("[limits]\ndeadline_s = nan\n", "limits.deadline_s"),
    ("[limits]\nshutdown_timeout_s = inf\n", "limits.shutdown_timeout_s"),
    ("[limits]\nqueue_size = 0.5\n", "limits.queue_size"),
    ("[limits]\nqueue_size = 1e300\n", "limits.queue_size"),
    ("[limits]\nmax_pixel_steps = -1\n", "limits.max_pixel_steps"),
    ("[models]\nsd15 = 'no'\nsdxl = 'no'\nadapter = 'no'\n", "models.sd15"),
    ("[models]\ndevice = 'cuda'\n", "models.device"),
    ("[models]\ndevice = 'bogus'\n", "models.device"),
    ("[models]\ntiny_seed = 18446744073709551616\n", "models.tiny_seed"),
    (b"[models]\ndevice = '\xff'\n", "not UTF-8"),
    ("[plugins.a]\nkind = 'lora'\npath = 'missing.safetensors'\n", "plugins.a.path"),
    ("[plugins.a]\nkind = 'controlnet'\npath = 'lora.safetensors'\nimage = 'missing.png'\n", "plugins.a.image"),
    ("[plugins.a]\nkind = 'controlnet'\npath = 'lora.safetensors'\nimage = 'notes.txt'\n", "plugins.a.image"),
    ("[plugins.'../../etc/passwd']\nkind = 'lora'\npath = 'lora.safetensors'\n", "plugins.../../etc/passwd"),
    ("[plugins.a]\nkind = 'lora'\npath = 'lora.safetensors'\nscale = nan\n", "plugins.a.scale"),
    ("[plugins.a]\nkind = 'lora'\npath = 'lora.safetensors'\nscale = 1e30\n", "plugins.a"),
    ("[plugins.a]\nkind = 'controlnet'\npath = 'lora.safetensors'\nscale = -1\n", "plugins.a"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, capsys, text, key):
    rc, err = start(tmp_path, capsys, text)
    assert rc == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], err


def test_a_file_that_is_not_its_kinds_model_is_one_line(tmp_path, capsys):
    """Found while loading (the tiny models first): still one line naming the plugin, exit 2."""
    rc, err = start(tmp_path, capsys, "[plugins.a]\nkind = 'controlnet'\npath = 'lora.safetensors'\n")
    assert rc == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: --config: plugins.a (kind 'controlnet'"), err


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_port_out_of_range_is_exit_2_naming_it(tmp_path, capsys, port):
    rc, err = start(tmp_path, capsys, "", ["--port", port])
    assert rc == 2 and "--port" in err and "[0, 65535]" in err, err


_KEYS = ["queue_size", "deadline_s", "shutdown_timeout_s", "max_steps", "max_side", "max_batch", "retry_after_s",
         "max_pixel_steps", "max_connections", "header_timeout_s"]
_value = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False), st.integers(min_value=-2**70, max_value=2**70),
    st.fractions(max_denominator=7).map(float), st.booleans(), st.text(max_size=5), st.just([1, 2]),
    st.just({"x": 1}))
_path = st.sampled_from(["", ".", "..", "missing", "lora.safetensors", "notes.txt", "/", "a\x00b", "../../etc/passwd"])
_name = st.one_of(st.sampled_from(["a", "../x", "a b", "", ".hidden", "x" * 80, "ok_1.v2"]), st.text(max_size=4))


@st.composite
def documents(draw):
    doc: dict = {}
    if draw(st.booleans()):
        doc["limits"] = draw(st.dictionaries(st.sampled_from(_KEYS + ["bogus"]), _value, max_size=3))
    if draw(st.booleans()):
        doc["models"] = {"device": draw(st.sampled_from(["cpu", "cuda", "cuda:7", "bogus", "", "mps", "cpu:0"])),
                         "tiny_seed": draw(st.one_of(st.integers(min_value=-2**70, max_value=2**70), _value))}
        if draw(st.booleans()):
            doc["models"].update({k: draw(_path) for k in ("sd15", "sdxl", "adapter")})
    if draw(st.booleans()):
        doc["plugins"] = {draw(_name): {"kind": draw(st.sampled_from(["lora", "controlnet", "ip", "bogus"])),
                                        "path": draw(_path), "scale": draw(_value),
                                        **({"image": draw(_path)} if draw(st.booleans()) else {})}}
    return doc


def _toml_value(v):
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.encode("unicode_escape").decode().replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"


def _toml(doc):
    out = []
    for table, body in doc.items():
        if table == "plugins":
            for name, plugin in body.items():
                out.append(f"[plugins.{_toml_value(name)}]")
                out += [f"{k} = {_toml_value(v)}" for k, v in plugin.items()]
        else:
            out.append(f"[{table}]")
            out += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
    return "\n".join(out) + "\n"


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(documents())
def test_config_property_no_traceback_at_start(tmp_path, doc):
    """Parse + the start-time checks (no model loaded): either a config or one ConfigError."""
    (tmp_path / "lora.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    path = tmp_path / "serve.toml"
    path.write_text(_toml(doc), encoding="utf-8")
    try:
        cfg = load_config(path)
        check_at_start(cfg)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    for f, value in vars(cfg.limits).items():  # what passed is finite, in range and of the field's type
        assert isinstance(value, type(getattr(Limits(), f))) and math.isfinite(value) and value > 0, (f, value)
    for spec in cfg.plugins.values():
        assert math.isfinite(spec.scale) and abs(spec.scale) <= 10
