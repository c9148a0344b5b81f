"""The example workflows against ComfyUI's real node definitions (no models are loaded).

API format (`example_workflows/*_api.json`):
* every class_type is one of ComfyUI's nodes or the pack's, every input it sets is one of
  that node's INPUT_TYPES inputs and every required input is set;
* every link reads an existing output slot whose type the input accepts (ComfyUI's own
  check, comfy_execution.validation.validate_node_input).

UI format (its `*_ui.json` twin, for dragging into the ComfyUI page):
* it is exactly what `example_workflows/api_to_ui.py` makes of the API file, so the two cannot
  drift apart (regenerate it with that script after editing the API file);
* it has the shape of the frontend's schema 0.4 workflow (nodes, 6-field links, ids,
  a topological "order");
* every API link is a UI link with the same endpoints and type, and every widget value
  of the API node sits at its position in widgets_values (a seed's "control after
  generate" value following it);
* for the core nodes, widgets_values has as many entries as in the workflow templates
  ComfyUI ships (saved by the real frontend), with a control value where they have one.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO

WORKFLOWS = REPO / "comfyui_xadapter" / "example_workflows"
NAMES = sorted(p.name[: -len("_api.json")] for p in WORKFLOWS.glob("*_api.json"))  # each has a _ui.json twin

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


@pytest.fixture(scope="module")
def node_classes() -> dict:
    import comfy_extras.nodes_custom_sampler
    import nodes

    from comfyui_xadapter.nodes import NODE_CLASS_MAPPINGS as PACK_NODES

    return {**nodes.NODE_CLASS_MAPPINGS, **comfy_extras.nodes_custom_sampler.NODE_CLASS_MAPPINGS, **PACK_NODES}


@pytest.fixture(scope="module", params=NAMES)
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def api(name) -> dict:
    return json.loads((WORKFLOWS / f"{name}_api.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def ui(name) -> dict:
    return json.loads((WORKFLOWS / f"{name}_ui.json").read_text(encoding="utf-8"))


def test_every_api_workflow_has_its_ui_twin():
    assert len(NAMES) >= 2
    for name in NAMES:
        assert (WORKFLOWS / f"{name}_ui.json").is_file(), name


def declared_inputs(node_class, sections=("required", "optional")) -> dict[str, tuple]:
    """name -> (type, options) over the given INPUT_TYPES sections, in declaration order."""
    declared = node_class.INPUT_TYPES()
    inputs = {}
    for section in sections:
        for name, spec in (declared.get(section) or {}).items():
            inputs[name] = (spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    return inputs


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2


def ui_nodes_by_id(ui: dict) -> dict[int, dict]:
    return {node["id"]: node for node in ui["nodes"]}


# --- API format -------------------------------------------------------------------------


def test_api_node_classes_exist(api, node_classes):
    missing = {key: entry["class_type"] for key, entry in api.items() if entry["class_type"] not in node_classes}
    assert not missing, f"class_types in neither ComfyUI's nor the pack's NODE_CLASS_MAPPINGS: {missing}"


def test_api_inputs_are_declared_and_complete(api, node_classes):
    for key, entry in api.items():
        node_class = node_classes[entry["class_type"]]
        known = declared_inputs(node_class, ("required", "optional", "hidden"))
        unknown = set(entry["inputs"]) - set(known)
        assert not unknown, f"node {key} ({entry['class_type']}): {sorted(unknown)} not in its INPUT_TYPES"
        missing = set(declared_inputs(node_class, ("required",))) - set(entry["inputs"])
        assert not missing, f"node {key} ({entry['class_type']}): required inputs {sorted(missing)} not set"


def test_api_links_read_existing_slots_of_matching_type(api, node_classes):
    from comfy_execution.validation import validate_node_input

    checked = 0
    for key, entry in api.items():
        inputs = declared_inputs(node_classes[entry["class_type"]])
        for name, value in entry["inputs"].items():
            if not is_link(value):
                continue
            source_key, slot = value
            assert source_key in api, f"node {key}.{name}: links from missing node {source_key}"
            outputs = node_classes[api[source_key]["class_type"]].RETURN_TYPES
            assert isinstance(slot, int) and 0 <= slot < len(outputs), (
                f"node {key}.{name}: slot {slot} of node {source_key}, which has {len(outputs)} outputs")
            received, expected = outputs[slot], inputs[name][0]
            assert validate_node_input(received, expected), (
                f"node {key}.{name} wants {expected}, node {source_key} slot {slot} gives {received}")
            checked += 1
    assert checked >= 20  # the example's 28 links; guards against reading nothing


# --- UI format --------------------------------------------------------------------------


def test_ui_file_is_generated_from_api_file(name, api, ui, node_classes):
    from comfyui_xadapter.example_workflows.api_to_ui import api_to_ui

    folder = "comfyui_xadapter/example_workflows"
    assert ui == api_to_ui(api, node_classes), (
        f"{name}_ui.json is stale: run `python {folder}/api_to_ui.py {folder}/{name}_api.json {folder}/{name}_ui.json`")
    assert (WORKFLOWS / f"{name}_ui.json").read_text(encoding="utf-8").endswith("}\n")


def test_ui_has_the_frontend_schema_shape(ui):
    assert ui["version"] == 0.4
    assert ui["groups"] == [] and ui["config"] == {} and ui["extra"]["ds"] == {"scale": 1, "offset": [0, 0]}
    ids = [node["id"] for node in ui["nodes"]]
    assert len(set(ids)) == len(ids) and all(isinstance(i, int) for i in ids)
    assert ui["last_node_id"] == max(ids)
    link_ids = [link[0] for link in ui["links"]]
    assert len(set(link_ids)) == len(link_ids) and ui["last_link_id"] == max(link_ids)
    for node in ui["nodes"]:
        for field, kind in (("type", str), ("flags", dict), ("order", int), ("mode", int), ("properties", dict),
                            ("inputs", list), ("outputs", list), ("widgets_values", list)):
            assert isinstance(node[field], kind), f"node {node['id']}: {field}"
        for field in ("pos", "size"):
            assert len(node[field]) == 2 and all(isinstance(v, (int, float)) for v in node[field])
        assert node["properties"]["Node name for S&R"] == node["type"]
        for slot in node["inputs"]:
            assert set(slot) >= {"name", "type", "link"}
        for index, slot in enumerate(node["outputs"]):
            assert set(slot) >= {"name", "type", "links"} and slot["slot_index"] == index
    assert sorted(node["order"] for node in ui["nodes"]) == list(range(len(ids)))
    by_id = ui_nodes_by_id(ui)
    for link in ui["links"]:
        assert len(link) == 6
        assert by_id[link[1]]["order"] < by_id[link[3]]["order"], f"link {link[0]} runs against the order"


def test_ui_titles_come_from_api(api, ui):
    by_id = ui_nodes_by_id(ui)
    for key, entry in api.items():
        assert by_id[int(key)].get("title") == entry.get("_meta", {}).get("title")


def test_every_api_link_is_a_ui_link(api, ui, node_classes):
    by_id = ui_nodes_by_id(ui)
    ui_links = {link[0]: link for link in ui["links"]}
    api_link_count = 0
    for key, entry in api.items():
        target = by_id[int(key)]
        assert target["type"] == entry["class_type"]
        for name, value in entry["inputs"].items():
            if not is_link(value):
                continue
            api_link_count += 1
            slots = [i for i, slot in enumerate(target["inputs"]) if slot["name"] == name]
            assert len(slots) == 1, f"node {key}: no single UI input {name!r}"
            link_id = target["inputs"][slots[0]]["link"]
            source_key, source_slot = value
            link_type = node_classes[api[source_key]["class_type"]].RETURN_TYPES[source_slot]
            assert ui_links[link_id] == [link_id, int(source_key), source_slot, int(key), slots[0], link_type]
            source_output = by_id[int(source_key)]["outputs"][source_slot]
            assert link_id in source_output["links"] and source_output["type"] == link_type
    assert len(ui["links"]) == api_link_count
    linked_from_outputs = sorted(i for node in ui["nodes"] for out in node["outputs"] for i in out["links"])
    assert linked_from_outputs == sorted(ui_links)


def test_widget_values_sit_in_position(api, ui, node_classes):
    by_id = ui_nodes_by_id(ui)
    for key, entry in api.items():
        values = by_id[int(key)]["widgets_values"]
        position = 0
        for name, (input_type, options) in declared_inputs(node_classes[entry["class_type"]]).items():
            widget = (isinstance(input_type, list) or input_type in WIDGET_TYPES) and not options.get("forceInput")
            if not widget:
                continue
            value = entry["inputs"].get(name)
            if value is not None and not is_link(value):
                assert values[position] == value, f"node {key}: widget {name!r} at {position} of {values}"
            position += 1
            if input_type == "INT" and options.get("control_after_generate", name in ("seed", "noise_seed")):
                assert values[position] == "fixed", f"node {key}: no control value after {name!r} in {values}"
                position += 1
            if options.get("image_upload"):
                assert values[position] == "image", f"node {key}: no upload widget after {name!r} in {values}"
                position += 1
        assert len(values) == position, f"node {key} ({entry['class_type']}): widgets_values {values}"


def test_widget_counts_match_comfyui_templates(ui):
    templates = pytest.importorskip("comfyui_workflow_templates")
    saved: dict[str, list[list]] = {}
    for path in sorted(Path(templates.get_templates_path()).glob("*.json")):
        try:
            workflow = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        for node in workflow.get("nodes", []) if isinstance(workflow, dict) else []:
            if isinstance(node.get("widgets_values"), list):
                saved.setdefault(node.get("type"), []).append(node["widgets_values"])
    compared = 0
    for node in ui["nodes"]:
        if node["type"] not in saved:
            continue  # the pack's nodes
        lengths = Counter(len(values) for values in saved[node["type"]])
        assert len(node["widgets_values"]) == lengths.most_common(1)[0][0], (
            f"{node['type']}: {node['widgets_values']} vs template lengths {dict(lengths)}")
        for index, value in enumerate(node["widgets_values"]):
            if value == "fixed":
                assert any(values[index] in CONTROL_VALUES for values in saved[node["type"]]), (
                    f"{node['type']}: templates hold no control value at {index}")
        compared += 1
    assert compared >= 10  # the core nodes of the example
