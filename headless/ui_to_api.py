"""Convert a UI-format workflow (what the ComfyUI frontend saves) into an API-format prompt (what ``POST /prompt``
and the executor take), using node definitions — the same conversion the frontend's ``graphToPrompt`` does.

* ``widgets_values`` are positional: they are mapped to input names with ``nodeinfo.widget_layout`` (the
  frontend-only entries — control after generate, filter list, upload button — are skipped);
* links are followed through ``Reroute`` nodes; a ``PrimitiveNode``'s value flows into the widget it is linked
  to; ``Note``/``MarkdownNote`` are dropped;
* muted nodes (mode 2) are dropped, and so are the inputs linked to them; bypassed nodes (mode 4) are dropped and
  each link through one is rerouted to the bypassed node's first input of the same type (the frontend's rule);
* API-format input (``{id: {"class_type", "inputs"}}``, optionally wrapped as ``{"prompt": {...}}``) is returned
  unchanged (as a copy).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from .nodeinfo import VIRTUAL_NODES, default_value, widget_layout

MUTED, BYPASSED = 2, 4

# Widgets that a node type of this pack showed in an earlier release after all of its current widgets, in that
# order: a file saved then stores their values after the current ones. Each release appended to this list, so a
# file stores a prefix of it. The values are passed on as inputs of the node itself, which still reads them (the
# samplers' expert knobs, now inputs of 'UG Sampler Options'; nodes/sampler_nodes.py LEGACY_LAYOUT).
_SAMPLER_TAIL = ("schedule", "backward_optimizer", "backward_early_stop", "jacobian", "smoothing",
                 "smoothing_samples", "smoothing_reduction", "max_step", "cfg_branch", "low_memory")
LEGACY_WIDGETS = {"UniversalGuidanceKSampler": _SAMPLER_TAIL, "UniversalGuidanceSampler": _SAMPLER_TAIL}
# Sockets such a node had then (name → type): a link into one is passed on too.
LEGACY_SOCKETS = {"UniversalGuidanceKSampler": {"guidance_vae": "VAE"},
                  "UniversalGuidanceSampler": {"guidance_vae": "VAE"}}


class WorkflowError(ValueError):
    """The file is not a workflow this converter can read."""


class UnknownNodeTypes(WorkflowError):
    """The workflow uses node types that the host does not define: ``missing`` is ``[(node id, type), ...]``."""

    def __init__(self, missing: list[tuple[str, str]]):
        self.missing = missing
        names = ", ".join(f"{t} (node {i})" for i, t in missing)
        super().__init__(f"unknown node types: {names}")


@dataclass(frozen=True)
class Link:
    id: int
    origin_id: str
    origin_slot: int
    target_id: str
    target_slot: int
    type: str


def _unwrap(data):
    """``{"prompt": {...}}`` (a POST /prompt body) → the prompt itself."""
    if (isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "nodes" not in data
            and "class_type" not in data["prompt"]):
        return data["prompt"]
    return data


def is_api_format(data) -> bool:
    data = _unwrap(data)
    return (isinstance(data, dict) and "nodes" not in data and bool(data)
            and all(isinstance(v, dict) and "class_type" in v for v in data.values()))


def is_ui_format(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def read_links(workflow: dict) -> dict[int, Link]:
    out = {}
    for entry in workflow.get("links") or []:
        if isinstance(entry, dict):  # schema version 1 of the newer frontend
            e = entry
            link = Link(int(e["id"]), str(e["origin_id"]), int(e["origin_slot"]), str(e["target_id"]),
                        int(e["target_slot"]), str(e.get("type", "*")))
        else:
            lid, oid, oslot, tid, tslot, ltype = (list(entry) + ["*"])[:6]
            link = Link(int(lid), str(oid), int(oslot), str(tid), int(tslot), str(ltype))
        out[link.id] = link
    return out


def input_name(inp: dict) -> str:
    widget = inp.get("widget")
    if isinstance(widget, dict) and widget.get("name"):
        return widget["name"]
    return inp["name"]


class _Value:
    """A widget value that a PrimitiveNode pushes into its target."""

    def __init__(self, value):
        self.value = value


def _check_supported(workflow: dict):
    if not is_ui_format(workflow):
        raise WorkflowError("not a ComfyUI workflow: expected a UI-format file (with 'nodes' and 'links') or an "
                            "API-format prompt ({id: {'class_type', 'inputs'}})")
    subgraphs = (workflow.get("definitions") or {}).get("subgraphs")
    if subgraphs:
        raise WorkflowError("the workflow contains subgraphs, which this converter does not expand; convert "
                            "them back to nodes in ComfyUI, or export the API format (Workflow → Export (API))")
    if (workflow.get("extra") or {}).get("groupNodes"):
        raise WorkflowError("the workflow contains group nodes, which this converter does not expand; ungroup "
                            "them in ComfyUI, or export the API format")


def ui_to_api(workflow: dict, info: dict, *, warnings: list | None = None) -> dict:
    """The API-format prompt of ``workflow``. ``info``: ``{node type: object_info entry}`` of the host.

    Raises ``UnknownNodeTypes`` when a (non-virtual, not muted/bypassed) node type is not in ``info``, and
    ``WorkflowError`` for files it cannot read. ``warnings`` collects notes about values it had to guess.
    """
    if is_api_format(workflow):
        prompt = copy.deepcopy(_unwrap(workflow))
        missing = [(i, n["class_type"]) for i, n in prompt.items() if n["class_type"] not in info]
        if missing:
            raise UnknownNodeTypes(missing)
        return prompt
    _check_supported(workflow)
    warnings = warnings if warnings is not None else []
    nodes = {str(n["id"]): n for n in workflow["nodes"]}
    links = read_links(workflow)

    missing = [(i, n["type"]) for i, n in nodes.items()
               if n["type"] not in info and n["type"] not in VIRTUAL_NODES and n.get("mode", 0) not in (MUTED,
                                                                                                       BYPASSED)]
    if missing:
        raise UnknownNodeTypes(missing)

    def node_inputs(node):
        return node.get("inputs") or []

    def resolve(link: Link, want_type: str):
        """Follow a link back through Reroutes and bypassed nodes: a Link, a _Value (PrimitiveNode) or None."""
        seen = set()
        while True:
            if link.id in seen:
                raise WorkflowError(f"link {link.id} is part of a cycle of Reroute/bypassed nodes")
            seen.add(link.id)
            parent = nodes.get(link.origin_id)
            if parent is None:
                return None
            ptype, mode = parent["type"], parent.get("mode", 0)
            if ptype == "PrimitiveNode":
                values = parent.get("widgets_values") or []
                return _Value(values[0]) if values else None
            if ptype in VIRTUAL_NODES:  # Reroute: follow its input
                ins = node_inputs(parent)
                slot = link.origin_slot if link.origin_slot < len(ins) else 0
                nxt = ins[slot].get("link") if ins else None
                if nxt is None or nxt not in links:
                    return None
                link = links[nxt]
                continue
            if mode == BYPASSED:
                ins = node_inputs(parent)
                order = [link.origin_slot] + list(range(len(ins)))
                nxt = None
                for slot in order:
                    if slot < len(ins) and ins[slot].get("type") == want_type:
                        nxt = ins[slot].get("link")
                        break
                if nxt is None or nxt not in links:
                    return None
                link = links[nxt]
                continue
            return link

    prompt = {}
    for nid, node in nodes.items():
        ntype, mode = node["type"], node.get("mode", 0)
        if ntype in VIRTUAL_NODES or mode in (MUTED, BYPASSED):
            continue
        layout = widget_layout(info[ntype])
        values = node.get("widgets_values")
        inputs = {}
        if isinstance(values, dict):  # some custom frontends store widgets by name
            for slot in layout:
                if slot.serialized and slot.name in values:
                    inputs[slot.name] = values[slot.name]
        elif values is not None:
            values = list(values)
            extra = values[len(layout):]
            for name, value in zip(LEGACY_WIDGETS.get(ntype, ()), extra):
                inputs[name] = value  # an earlier release's layout
            extra = extra[len(LEGACY_WIDGETS.get(ntype, ())):]
            if extra:
                warnings.append(f"node {nid} ({ntype}): {len(values)} widget values for {len(layout)} widgets; "
                                f"the extra values {extra!r} are ignored")
            for slot, value in zip(layout, values):
                if slot.serialized:
                    inputs[slot.name] = value
        for slot in layout[len(values or []):] if not isinstance(values, dict) else []:
            if slot.serialized:
                inputs[slot.name] = default_value(slot.spec)
                warnings.append(f"node {nid} ({ntype}): no stored value for '{slot.name}'; using the default "
                                f"{inputs[slot.name]!r}")
        for inp in node_inputs(node):
            lid = inp.get("link")
            if lid is None:
                continue
            if lid not in links:
                warnings.append(f"node {nid} ({ntype}): input '{inp.get('name')}' refers to a missing link {lid}")
                continue
            target = resolve(links[lid], inp.get("type"))
            name = input_name(inp)
            if isinstance(target, _Value):
                inputs[name] = target.value
            elif target is not None:
                inputs[name] = [target.origin_id, target.origin_slot]
        entry = {"inputs": inputs, "class_type": ntype}
        title = node.get("title") or info[ntype].get("display_name") or ntype
        entry["_meta"] = {"title": title}
        prompt[nid] = entry

    # Like the frontend: drop inputs linked to nodes that are not in the prompt (muted, bypassed without a match).
    for nid, entry in prompt.items():
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


def api_link_check(prompt: dict, info: dict) -> list[str]:
    """Type errors of the links of an API-format prompt: output type vs input type (``[]`` when all match)."""
    from .nodeinfo import input_type, spec_of, types_compatible
    errors = []
    for nid, entry in prompt.items():
        dest = info.get(entry["class_type"])
        if dest is None:
            continue
        for name, value in entry["inputs"].items():
            if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)):
                continue
            src = prompt.get(value[0])
            if src is None:
                errors.append(f"node {nid} input '{name}' links to missing node {value[0]}")
                continue
            outputs = info[src["class_type"]]["output"]
            if not 0 <= value[1] < len(outputs):
                errors.append(f"node {nid} input '{name}' links to output {value[1]} of node {value[0]} "
                              f"({src['class_type']}), which has {len(outputs)} outputs")
                continue
            out_type = outputs[value[1]]
            out_type = "COMBO" if isinstance(out_type, (list, tuple)) else out_type
            spec = spec_of(dest, name)
            legacy = LEGACY_SOCKETS.get(entry["class_type"], {}).get(name)
            if spec is None and legacy is None:
                errors.append(f"node {nid} ({entry['class_type']}) has no input '{name}'")
                continue
            want = input_type(spec) if spec is not None else legacy
            if not types_compatible(out_type, want):
                errors.append(f"node {nid} ({entry['class_type']}) input '{name}' ({want}) is linked "
                              f"to output {value[1]} of node {value[0]} ({src['class_type']}), type {out_type}")
    return errors
