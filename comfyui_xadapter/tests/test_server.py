"""End to end: a real ComfyUI server, the pack linked into its custom_nodes/, the example
workflow posted to /prompt, the PNG checked; bad inputs give node errors and the server
keeps serving.

ComfyUI (from $XA_COMFYUI_DIR or ../shared/comfyui) is copied to a temporary folder, so
the shared tree is never written to, and started headless on the CPU with this Python.
The example workflow runs as committed except for what needs real weights: its
CheckpointLoaderSimple / CLIPTextEncode nodes become the tiny stand-ins of tiny_nodes/
(the same outputs in the same slots), LoraLoader becomes LoraLoaderModelOnly (the tiny
CLIP has no LoRA keys) with a random tiny LoRA, ControlNetLoader and LoadImage get a tiny
ControlNet and a random edge image, and sizes and steps shrink for the CPU.
"""

from __future__ import annotations

import copy
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import COMFYUI, REPO

WORKFLOWS = REPO / "comfyui_xadapter" / "example_workflows"
NAMES = ("xadapter_lora", "xadapter_controlnet")
STARTUP_S, RUN_S = 240, 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root: Path, port: int, proc: subprocess.Popen, log: Path):
        self.root, self.url, self.proc, self.log = root, f"http://127.0.0.1:{port}", proc, log

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post_prompt(self, workflow: dict) -> tuple[int, dict]:
        body = json.dumps({"prompt": workflow, "client_id": "xa-runtime-tests"}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def wait(self, prompt_id: str) -> dict:
        deadline = time.monotonic() + RUN_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "ComfyUI exited:\n" + self.log_tail()
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                if history[prompt_id]["status"].get("status_str") in ("success", "error"):
                    return history[prompt_id]
            time.sleep(0.5)
        pytest.fail(f"prompt {prompt_id} did not finish in {RUN_S} s:\n" + self.log_tail())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfyui") / "ComfyUI"
    shutil.copytree(COMFYUI, root, ignore=shutil.ignore_patterns("tests", "tests-unit", ".git", "__pycache__"))
    nodes = root / "custom_nodes"
    nodes.mkdir(exist_ok=True)
    (nodes / "comfyui_xadapter").symlink_to(REPO / "comfyui_xadapter", target_is_directory=True)
    (nodes / "xa_tiny_test_nodes").symlink_to(REPO / "comfyui_xadapter" / "tests" / "tiny_nodes", target_is_directory=True)

    from xa_runtime.models.tiny import build_tiny_models
    from xa_runtime.testing.lora import write_random_lora
    from xa_runtime.testing.plugins import write_tiny_controlnet

    sd15, _, mapping = build_tiny_models(0)
    adapters = root / "models" / "xadapter"
    adapters.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in mapping.state_dict().items()}, adapters / "X_Adapter_tiny.safetensors")
    (adapters / "broken.safetensors").write_bytes(b"\x00 not a safetensors file")
    torch.save({"conv.weight": torch.zeros(1)}, adapters / "not_an_adapter.bin")
    (root / "models" / "loras").mkdir(parents=True, exist_ok=True)
    write_random_lora(root / "models" / "loras" / "tiny_sd15_lora.safetensors", sd15.unet, fmt="kohya", std=0.2)
    write_tiny_controlnet(root / "models" / "controlnet", sd15.unet, seed=3)  # control_tiny_sd15.safetensors
    (root / "input").mkdir(exist_ok=True)
    edges = (torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(5)) > 0.8).to(torch.uint8) * 255
    Image.fromarray(edges.numpy()).save(root / "input" / "tiny_control.png")

    port, log = _free_port(), root / "server.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--disable-auto-launch", "--disable-api-nodes", "--database-url", "sqlite:///:memory:"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT)
    srv = Server(root, port, proc, log)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail("ComfyUI exited at startup:\n" + srv.log_tail())
            try:
                srv.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer in {STARTUP_S} s:\n" + srv.log_tail())
                time.sleep(0.5)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def tiny_workflow(adapter_name: str = "X_Adapter_tiny.safetensors", seed: int = 42, name: str = NAMES[0]) -> dict:
    """An example workflow with the tiny stand-ins (module docstring)."""
    wf = copy.deepcopy(json.loads((WORKFLOWS / f"{name}_api.json").read_text()))
    rewire = {}
    for node_id, node in wf.items():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            family = "sdxl" if "xl" in inputs["ckpt_name"].lower() else "sd15"
            node.update(class_type="XATinyCheckpoint", inputs={"family": family})
        elif kind == "CLIPTextEncode":
            node["class_type"] = "XATinyTextEncode"
        elif kind == "LoraLoader":
            rewire[(node_id, 1)] = inputs["clip"]
            node.update(class_type="LoraLoaderModelOnly", inputs={
                "model": inputs["model"], "lora_name": "tiny_sd15_lora.safetensors", "strength_model": 1.0})
        elif kind == "ControlNetLoader":
            inputs["control_net_name"] = "control_tiny_sd15.safetensors"
        elif kind == "LoadImage":
            inputs["image"] = "tiny_control.png"
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "XAdapterSampler":
            inputs.update(width=128, height=128)
        elif kind in ("KSampler", "BasicScheduler"):
            inputs["steps"] = 6
        elif kind == "XAdapterLoader":
            inputs.update(adapter_name=adapter_name, weight_dtype="fp32")
        if "seed" in inputs:
            inputs["seed"] = seed
        if "noise_seed" in inputs:
            inputs["noise_seed"] = seed
    for node in wf.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and tuple(value) in rewire:
                node["inputs"][name] = rewire[tuple(value)]
    return wf


def _run_ok(server: Server, workflow: dict) -> Path:
    status, body = server.post_prompt(workflow)
    assert status == 200, body
    entry = server.wait(body["prompt_id"])
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1) + server.log_tail()
    (image,) = entry["outputs"]["17"]["images"]
    return server.root / "output" / image["subfolder"] / image["filename"]


def test_pack_is_listed(server):
    info = server.get("/object_info")
    for name in ("XAdapterLoader", "XAdapterGuider", "XAdapterSampler"):
        assert name in info, f"{name} not registered:\n" + server.log_tail()
    assert "X_Adapter_tiny.safetensors" in info["XAdapterLoader"]["input"]["required"]["adapter_name"][0]
    # example_workflows/ is where ComfyUI's template browser looks for a pack's workflows
    templates = server.get("/workflow_templates")
    listed = set(templates.get("comfyui_xadapter", []))
    assert {f"{n}_{kind}" for n in NAMES for kind in ("api", "ui")} <= listed, templates


@pytest.mark.parametrize("name", NAMES)
def test_example_workflow_writes_the_png(server, name):
    path = _run_ok(server, tiny_workflow(name=name))
    with Image.open(path) as im:
        assert im.size == (128, 128) and im.format == "PNG"
        pixels = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8).float()
    assert pixels.std() > 1.0, "a flat image"


def _execution_error(server: Server, workflow: dict) -> dict:
    status, body = server.post_prompt(workflow)
    assert status == 200, body
    entry = server.wait(body["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors, entry["status"]
    return errors[0]


def test_bad_inputs_are_node_errors_and_the_server_keeps_serving(server):
    # a file that is not an X-Adapter checkpoint: an execution error of the loader, naming the input
    for name in ("broken.safetensors", "not_an_adapter.bin"):
        err = _execution_error(server, tiny_workflow(adapter_name=name))
        assert err["node_type"] == "XAdapterLoader", err
        assert f"adapter_name: '{name}'" in err["exception_message"], err
        assert "Traceback" not in err["exception_message"]
    # a name not in models/xadapter: refused by ComfyUI's validation before anything runs
    status, body = server.post_prompt(tiny_workflow(adapter_name="missing.safetensors"))
    assert status == 400 and "10" in body["node_errors"], body
    # models swapped between the guider's inputs: the guider names the input
    wf = tiny_workflow(seed=7)
    guider = wf["11"]["inputs"]
    guider["sd15_model"], guider["sdxl_model"] = guider["sdxl_model"], guider["sd15_model"]
    err = _execution_error(server, wf)
    assert err["node_type"] == "XAdapterGuider" and err["exception_message"].startswith("sd15_model:"), err
    # a width that is not a multiple of 8: refused by the sampler's validation, naming it
    wf = tiny_workflow()
    wf["15"]["inputs"]["width"] = 100
    status, body = server.post_prompt(wf)
    assert status == 400 and "width: 100" in json.dumps(body["node_errors"]["15"]), body
    # still serving: a good prompt runs after the errors
    assert server.proc.poll() is None
    assert _run_ok(server, tiny_workflow(seed=3)).is_file()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_loads_in_comfyuis_own_frontend(server, name):
    """The UI-format example, loaded by ComfyUI's web frontend (its bundled package, in
    headless Debian chromium), turns back into exactly the API-format example: the
    frontend's own graphToPrompt is the judge of the UI file."""
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is installed in ComfyUI's venv by .ci/run")
    ui, api = (json.loads((WORKFLOWS / f"{name}_{kind}.json").read_text()) for kind in ("ui", "api"))
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=flags)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url, timeout=120_000)
            page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120_000)
            page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", ui)
            output = page.evaluate("async () => (await window.app.graphToPrompt()).output")
        finally:
            browser.close()
    assert set(output) == set(api), (sorted(output), sorted(api))
    for node_id, node in api.items():
        got = output[node_id]
        assert got["class_type"] == node["class_type"], node_id
        assert got["inputs"] == node["inputs"], (node_id, got["inputs"], node["inputs"])
    assert not [e for e in errors if "X-Adapter" in e or "XAdapter" in e], errors
