"""Turns a workflow in ComfyUI's API format into the UI (litegraph) format.

The API format (`xadapter_lora_api.json`, what "Export (API)" saves and /prompt takes)
can be queued but not dragged into the ComfyUI page as a graph; the UI format (what the
web frontend's "Save" writes, schema version 0.4) can. ComfyUI ships no API -> UI
converter in Python (the frontend builds the UI graph in TypeScript, from live nodes), so
this small one is written by hand. It needs only the node classes: their INPUT_TYPES
give the input sockets and the order of the widget values, RETURN_TYPES / RETURN_NAMES
the output slots.

What the frontend expects, and what this writes:

* Each input of INPUT_TYPES ("required", then "optional"; "hidden" ones are not shown)
  is either a widget (INT, FLOAT, STRING, BOOLEAN, COMBO or a list of choices, unless its
  options say forceInput) or a socket. Sockets are listed in a node's "inputs"; a link's
  target slot is the index in that list. A widget the API feeds from a link is listed
  there too, after the sockets, marked {"widget": {"name": ...}}.
* "widgets_values" holds one value per widget, in INPUT_TYPES order. The frontend gives
  an INT a "control after generate" widget when its options ask for one, or when they
  say nothing and it is named seed or noise_seed (a FLOAT only when asked); that
  widget's value is saved right after the number's. It is written as "fixed" so the
  graph reproduces the API workflow's seeds until the user picks another mode.
* An input with {"image_upload": True} (LoadImage's image) gets the frontend's upload
  button after it, a widget whose saved value is "image".
* Links are [link_id, from_node, from_slot, to_node, to_slot, type], the type being
  that of the output slot.
* Nodes are laid out left to right by topological depth, one column per depth.

Usage (with ComfyUI's Python; ComfyUI is found at $XA_COMFYUI_DIR, else
../shared/comfyui next to the repository):

    python comfyui_xadapter/example_workflows/api_to_ui.py IN_API.json OUT_UI.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_INPUT_NAMES = ("seed", "noise_seed")
CONTROL_AFTER_GENERATE = "fixed"
UI_SCHEMA_VERSION = 0.4

# Layout, in canvas pixels. The heights follow litegraph's own node sizing (20 px per
# slot row, 24 px per widget), so nodes open neither clipped nor padded.
COLUMN_SPACING = 420
NODE_WIDTH = 315
WIDE_NODE_WIDTH = 360  # nodes with a multiline text box
TITLE_HEIGHT = 30  # drawn above a node's pos
ROW_GAP = 40
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 24
MULTILINE_EXTRA_HEIGHT = 100


def input_specs(node_class) -> list[tuple[str, Any, dict]]:
    """(name, type, options) of the node's visible inputs: required, then optional."""
    declared = node_class.INPUT_TYPES()
    specs = []
    for section in ("required", "optional"):
        for name, spec in (declared.get(section) or {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, spec[0], options))
    return specs


def is_widget(input_type, options: dict) -> bool:
    if options.get("forceInput"):
        return False
    return isinstance(input_type, (list, tuple)) or input_type in WIDGET_TYPES


def slot_type(declared_type) -> str:
    """The type the frontend gives a slot: a list of choices is a COMBO."""
    return "COMBO" if isinstance(declared_type, (list, tuple)) else declared_type


def has_control_widget(name: str, input_type, options: dict) -> bool:
    """Whether the frontend adds a "control after generate" widget after this one."""
    asked = options.get("control_after_generate")
    if input_type == "INT":
        return bool(asked) if asked is not None else name in SEED_INPUT_NAMES
    if input_type == "FLOAT":
        return bool(asked)
    if asked and is_widget(input_type, options):
        # A combo gets a control and a filter widget; not needed by these workflows.
        raise ValueError(f"input {name!r}: control_after_generate on a {slot_type(input_type)} is not supported")
    return False


def default_widget_value(input_type, options: dict):
    """The value a fresh frontend widget starts with (for widgets the API feeds by link)."""
    if "default" in options:
        return options["default"]
    if isinstance(input_type, (list, tuple)):
        return input_type[0] if input_type else None
    if input_type == "COMBO":
        choices = options.get("options") or []
        return choices[0] if choices else None
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(input_type)


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def output_slots(node_class) -> list[tuple[str, str]]:
    """(name, type) of each output slot."""
    types = list(getattr(node_class, "RETURN_TYPES", ()))
    names = list(getattr(node_class, "RETURN_NAMES", None) or ())
    return [(names[i] if i < len(names) else slot_type(t), slot_type(t)) for i, t in enumerate(types)]


def ui_node_ids(api: dict) -> dict[str, int]:
    """API node id -> UI node id: the same number where every id is one, else 1..N."""
    if all(str(key).isdigit() for key in api):
        return {key: int(key) for key in api}
    return {key: i for i, key in enumerate(api, start=1)}


def topological_order(ui_ids: list[int], sources: dict[int, set[int]]) -> list[int]:
    """Kahn's algorithm, lowest id first among the ready nodes (a stable order)."""
    waiting = {node: set(sources[node]) for node in ui_ids}
    order = []
    while waiting:
        ready = sorted(node for node, pending in waiting.items() if not pending)
        if not ready:
            raise ValueError(f"the workflow has a cycle among nodes {sorted(waiting)}")
        node = ready[0]
        order.append(node)
        del waiting[node]
        for pending in waiting.values():
            pending.discard(node)
    return order


def node_size(socket_count: int, output_count: int, widget_count: int, multiline_count: int) -> list[int]:
    rows = max(socket_count, output_count, 1)
    height = rows * SLOT_HEIGHT + 6
    if widget_count:
        height += widget_count * WIDGET_HEIGHT + 8 + multiline_count * MULTILINE_EXTRA_HEIGHT
    return [WIDE_NODE_WIDTH if multiline_count else NODE_WIDTH, height]


def api_to_ui(api: dict, node_classes: dict) -> dict:
    """The UI-format (schema 0.4) workflow of an API-format one.

    node_classes maps each class_type of the workflow to its node class (ComfyUI's and
    the custom packs' NODE_CLASS_MAPPINGS together).
    """
    ids = ui_node_ids(api)
    classes, specs, outputs = {}, {}, {}
    for key, entry in api.items():
        class_type = entry["class_type"]
        if class_type not in node_classes:
            raise KeyError(f"node {key}: unknown class_type {class_type!r}")
        classes[key] = node_classes[class_type]
        specs[key] = input_specs(classes[key])
        outputs[key] = output_slots(classes[key])
        unknown = set(entry.get("inputs", {})) - {name for name, _, _ in specs[key]}
        if unknown:
            raise ValueError(f"node {key} ({class_type}): inputs {sorted(unknown)} are not in its INPUT_TYPES")

    sources = {ids[key]: set() for key in api}
    for key, entry in api.items():
        for value in entry.get("inputs", {}).values():
            if is_link(value):
                if str(value[0]) not in api:
                    raise ValueError(f"node {key}: link from missing node {value[0]!r}")
                sources[ids[key]].add(ids[str(value[0])])
    order = topological_order(sorted(ids.values()), sources)

    # Build every node's sockets and widget values; links are numbered in node-id order.
    nodes: dict[int, dict] = {}
    links: list[list] = []
    pending_links = []  # (link id, source key, source slot), wired to outputs below
    for key in sorted(api, key=lambda k: ids[k]):
        entry, ui_id = api[key], ids[key]
        given = entry.get("inputs", {})
        sockets, converted, widgets_values = [], [], []
        multiline_count = 0
        for name, input_type, options in specs[key]:
            value = given.get(name)
            if not is_widget(input_type, options):
                sockets.append({"name": name, "type": slot_type(input_type), "link": None, "_value": value})
                continue
            if input_type == "STRING" and options.get("multiline"):
                multiline_count += 1
            if is_link(value):
                converted.append({"name": name, "type": slot_type(input_type), "link": None,
                                  "widget": {"name": name}, "_value": value})
                widgets_values.append(default_widget_value(input_type, options))
            else:
                widgets_values.append(value if name in given else default_widget_value(input_type, options))
            if has_control_widget(name, input_type, options):
                widgets_values.append(CONTROL_AFTER_GENERATE)
            if options.get("image_upload"):  # the frontend's upload button, a widget saved as "image"
                widgets_values.append("image")
        inputs = sockets + converted
        for to_slot, slot in enumerate(inputs):
            value = slot.pop("_value")
            if not is_link(value):
                continue
            from_key, from_slot = str(value[0]), value[1]
            if not 0 <= from_slot < len(outputs[from_key]):
                raise ValueError(f"node {key}: input {slot['name']!r} reads slot {from_slot} of node {from_key}, "
                                 f"which has {len(outputs[from_key])} outputs")
            link_id = len(links) + 1
            slot["link"] = link_id
            links.append([link_id, ids[from_key], from_slot, ui_id, to_slot, outputs[from_key][from_slot][1]])
            pending_links.append((link_id, from_key, from_slot))
        node = {
            "id": ui_id,
            "type": entry["class_type"],
            "pos": [0, 0],
            "size": node_size(len(inputs), len(outputs[key]), len(widgets_values), multiline_count),
            "flags": {},
            "order": order.index(ui_id),
            "mode": 0,
            "inputs": inputs,
            "outputs": [{"name": name, "type": type_, "links": [], "slot_index": slot}
                        for slot, (name, type_) in enumerate(outputs[key])],
        }
        title = (entry.get("_meta") or {}).get("title")
        if title:
            node["title"] = title
        node["properties"] = {"Node name for S&R": entry["class_type"]}
        node["widgets_values"] = widgets_values
        nodes[ui_id] = node
    for link_id, from_key, from_slot in pending_links:
        nodes[ids[from_key]]["outputs"][from_slot]["links"].append(link_id)

    layout(nodes, order, sources)
    return {
        "last_node_id": max(nodes, default=0),
        "last_link_id": len(links),
        "nodes": [nodes[ui_id] for ui_id in sorted(nodes)],
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1, "offset": [0, 0]}},
        "version": UI_SCHEMA_VERSION,
    }


def layout(nodes: dict[int, dict], order: list[int], sources: dict[int, set[int]]) -> None:
    """Sets each node's pos: one column per topological depth, left to right.

    A node's depth is the longest path to it from a node without inputs; such a node
    (a loader, a noise or sampler choice) moves right to just before its first consumer,
    so its links stay short. In a column, fed nodes are stacked by the mean height of
    what feeds them, so links mostly run straight, and the unfed ones go below them.
    """
    depth: dict[int, int] = {}
    for ui_id in order:
        depth[ui_id] = 1 + max((depth[s] for s in sources[ui_id]), default=-1)
    for ui_id in order:
        consumers = [other for other in order if ui_id in sources[other]]
        if not sources[ui_id] and consumers:
            depth[ui_id] = min(depth[c] for c in consumers) - 1

    def stacking_key(ui_id: int):
        if not sources[ui_id]:
            return (1, 0.0, ui_id)
        return (0, sum(centre[s] for s in sources[ui_id]) / len(sources[ui_id]), ui_id)

    centre: dict[int, float] = {}
    for column in range(max(depth.values(), default=-1) + 1):
        members = sorted((ui_id for ui_id in order if depth[ui_id] == column), key=stacking_key)
        y = 0
        for ui_id in members:
            height = nodes[ui_id]["size"][1]
            nodes[ui_id]["pos"] = [column * COLUMN_SPACING, y]
            centre[ui_id] = y + height / 2
            y += height + TITLE_HEIGHT + ROW_GAP


def load_node_classes(comfyui: Path) -> dict:
    """ComfyUI's built-in nodes, its custom-sampler nodes and this pack's, by class_type."""
    sys.path.insert(0, str(comfyui))
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = True
    import comfy_extras.nodes_custom_sampler
    import nodes

    from comfyui_xadapter.nodes import NODE_CLASS_MAPPINGS as PACK_NODES

    return {**nodes.NODE_CLASS_MAPPINGS, **comfy_extras.nodes_custom_sampler.NODE_CLASS_MAPPINGS, **PACK_NODES}


def write_json(path: Path, data: dict) -> None:
    """Pretty-printed with a trailing newline, via a temporary file and os.replace."""
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a workflow is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert a ComfyUI API-format workflow to the UI format.")
    parser.add_argument("api_json", type=Path, help="workflow in API format (Export (API))")
    parser.add_argument("ui_json", type=Path, help="where to write the UI-format workflow")
    options = parser.parse_args(argv)
    comfyui = Path(os.environ.get("XA_COMFYUI_DIR") or REPO.parent / "shared" / "comfyui").resolve()
    if not (comfyui / "nodes.py").is_file():
        parser.error(f"no ComfyUI at {comfyui} (set XA_COMFYUI_DIR)")
    api = json.loads(options.api_json.read_text(encoding="utf-8"))
    write_json(options.ui_json, api_to_ui(api, load_node_classes(comfyui)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
