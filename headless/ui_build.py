"""Build UI-format workflows (what the ComfyUI frontend saves and loads) from a compact description.

A description is a list of ``Node``s: a node id, a node type, a canvas position and its inputs by name — plain
values for widgets, ``link(node_id, output)`` for sockets. The node definitions of a live host
(``nodeinfo.object_info``) give the widget order, the defaults of the widgets not named, the socket types and the
output names, so the file always matches the nodes it was built against: ``widgets_values`` holds one entry per
widget in ``nodeinfo.widget_layout`` order (with ``"fixed"`` for a seed's control-after-generate widget and
``"image"`` for an upload button). ``Note`` nodes carry a text. Unknown input names, unconnected required sockets
and links between mismatched types are errors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .nodeinfo import default_value, input_options, input_type, socket_inputs, types_compatible, widget_layout

NOTE_TYPES = ("Note", "MarkdownNote")
SLOT_H, WIDGET_H, TITLE_H = 20, 24, 30


@dataclass(frozen=True)
class Ref:
    """A link source: output ``output`` (index or output name) of node ``node``."""
    node: int
    output: int | str = 0


def link(node: int, output: int | str = 0) -> Ref:
    return Ref(node, output)


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[float, float]
    inputs: dict = field(default_factory=dict)
    title: str | None = None
    size: tuple[float, float] | None = None
    color: str | None = None
    bgcolor: str | None = None


@dataclass
class Group:
    title: str
    members: list[int]
    color: str = "#3f789e"


class BuildError(ValueError):
    pass


def min_node_size(node_info: dict, title: str | None = None, values: dict | None = None) -> tuple[float, float]:
    """The smallest size (below the title bar) at which the frontend draws a node of this type without widgets or
    slots spilling out: one 20 px row per socket row (inputs and outputs side by side), 24 px per widget (90 for a
    multiline text box), and a margin; at least as large as the frontends' own ``computeSize`` (checked in the
    browser on the 2024-03 and the v0.3.64 frontends by tests/test_live_server.py). ``values`` (widget name →
    value) widens the node so that a one-line widget shows its label and its whole value side by side."""
    layout = widget_layout(node_info)
    rows = max(len(socket_inputs(node_info)), len(node_info.get("output") or ()), 1)
    height = rows * SLOT_H + 16
    for slot in layout:
        spec = slot.spec
        multiline = slot.kind == "value" and input_type(spec) == "STRING" and \
            isinstance(spec, (list, tuple)) and len(spec) > 1 and spec[1].get("multiline")
        height += 90 if multiline else WIDGET_H
    text = title or node_info.get("display_name") or node_info.get("name") or ""
    width = max(240, 8 * len(text) + 60)
    for slot in layout:
        value = (values or {}).get(slot.name, default_value(slot.spec)) if slot.kind == "value" else None
        if isinstance(value, str) and "\n" not in value and not (
                input_type(slot.spec) == "STRING" and input_options(slot.spec).get("multiline")):
            width = max(width, 7.5 * (len(slot.name) + len(value)) + 90)
    return float(round(width)), float(height)


def _output_index(info: dict, ref: Ref, node_type: str) -> int:
    outputs = list(info["output"])
    if isinstance(ref.output, int):
        if not 0 <= ref.output < len(outputs):
            raise BuildError(f"node {ref.node} ({node_type}) has no output {ref.output}")
        return ref.output
    names = list(info.get("output_name") or outputs)
    for i, name in enumerate(names):
        if name == ref.output:
            return i
    for i, kind in enumerate(outputs):
        if kind == ref.output:
            return i
    raise BuildError(f"node {ref.node} ({node_type}) has no output named {ref.output!r}; it has {names}")


def build_ui(nodes: list[Node], info: dict, *, groups: list[Group] = (), extra: dict | None = None) -> dict:
    """The UI-format workflow (version 0.4) of ``nodes``. ``info``: ``{node type: object_info entry}``."""
    by_id = {}
    for n in nodes:
        if n.id in by_id:
            raise BuildError(f"node id {n.id} is used twice")
        if n.type not in NOTE_TYPES and n.type not in info:
            raise BuildError(f"node {n.id}: this ComfyUI has no node type {n.type!r}")
        by_id[n.id] = n

    links, out_links = [], {}  # out_links[(node, slot)] = [link ids]
    ui_nodes = []
    for n in nodes:
        if n.type in NOTE_TYPES:
            ui_nodes.append({
                "id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size or (400, 200)), "flags": {},
                "order": 0, "mode": 0, "properties": {"text": ""}, "widgets_values": [n.inputs.get("text", "")],
                **({"title": n.title} if n.title else {}),
                "color": n.color or "#432", "bgcolor": n.bgcolor or "#653"})
            continue
        node_info = info[n.type]
        layout = widget_layout(node_info)
        widget_names = {s.name for s in layout if s.serialized}
        sockets = socket_inputs(node_info)
        socket_names = {name for name, _, _ in sockets}
        unknown = set(n.inputs) - widget_names - socket_names
        if unknown:
            raise BuildError(f"node {n.id} ({n.type}) has no input(s) {sorted(unknown)}; widgets: "
                             f"{sorted(widget_names)}, sockets: {sorted(socket_names)}")
        values = []
        for slot in layout:
            if slot.kind == "value":
                value = n.inputs.get(slot.name, default_value(slot.spec))
                if isinstance(value, Ref):
                    raise BuildError(f"node {n.id} ({n.type}): '{slot.name}' is a widget; converting widgets to "
                                     f"linked inputs is not supported by this builder")
                values.append(value)
            elif slot.kind == "control":
                values.append("fixed")
            elif slot.kind == "filter":
                values.append("")
            elif slot.kind == "upload":
                values.append("image")
        ui_inputs = []
        for slot_index, (name, kind, optional) in enumerate(sockets):
            ref = n.inputs.get(name)
            if ref is None:
                if not optional:
                    raise BuildError(f"node {n.id} ({n.type}): required input '{name}' ({kind}) is not connected")
                ui_inputs.append({"name": name, "type": kind, "link": None})
                continue
            if not isinstance(ref, Ref):
                raise BuildError(f"node {n.id} ({n.type}): input '{name}' is a socket; give link(node, output)")
            src = by_id.get(ref.node)
            if src is None or src.type in NOTE_TYPES:
                raise BuildError(f"node {n.id} ({n.type}): input '{name}' links to a missing node {ref.node}")
            src_info = info[src.type]
            out_index = _output_index(src_info, ref, src.type)
            out_type = src_info["output"][out_index]
            out_type = "COMBO" if isinstance(out_type, (list, tuple)) else out_type
            if not types_compatible(out_type, kind):
                raise BuildError(f"node {n.id} ({n.type}) input '{name}' ({kind}) cannot take output {out_index} "
                                 f"of node {src.id} ({src.type}), type {out_type}")
            link_id = len(links) + 1
            links.append([link_id, src.id, out_index, n.id, slot_index, out_type])
            out_links.setdefault((src.id, out_index), []).append(link_id)
            ui_inputs.append({"name": name, "type": kind, "link": link_id})
        need = min_node_size(node_info, n.title, n.inputs)
        size = [max(need[0], n.size[0]), max(need[1], n.size[1])] if n.size else list(need)
        entry = {
            "id": n.id, "type": n.type, "pos": list(n.pos), "size": size,
            "flags": {}, "order": 0, "mode": 0,
        }
        if ui_inputs:
            entry["inputs"] = ui_inputs
        entry["outputs"] = []
        if n.title:
            entry["title"] = n.title
        entry["properties"] = {"Node name for S&R": n.type}
        entry["widgets_values"] = values
        if n.color:
            entry["color"] = n.color
        if n.bgcolor:
            entry["bgcolor"] = n.bgcolor
        entry["_outputs"] = node_info
        ui_nodes.append(entry)

    for entry in ui_nodes:
        node_info = entry.pop("_outputs", None)
        if node_info is None:
            continue
        names = list(node_info.get("output_name") or node_info["output"])
        for i, kind in enumerate(node_info["output"]):
            kind = "COMBO" if isinstance(kind, (list, tuple)) else kind
            entry["outputs"].append({"name": names[i], "type": kind, "links": out_links.get((entry["id"], i), []),
                                     "slot_index": i})
        if not entry["outputs"]:
            del entry["outputs"]

    # Execution order, as the frontend stores it (it recomputes it on load).
    deps = {n["id"]: {l[1] for l in links if l[3] == n["id"]} for n in ui_nodes}
    order, done = [], set()
    while len(order) < len(ui_nodes):
        ready = sorted(i for i in deps if i not in done and deps[i] <= done)
        if not ready:
            raise BuildError("the links form a cycle")
        order.extend(ready)
        done.update(ready)
    for entry in ui_nodes:
        entry["order"] = order.index(entry["id"])

    ui_groups = []
    for g in groups:
        members = [e for e in ui_nodes if e["id"] in g.members]
        if len(members) != len(g.members):
            raise BuildError(f"group {g.title!r} names nodes that do not exist")
        x0 = min(e["pos"][0] for e in members) - 20
        y0 = min(e["pos"][1] for e in members) - TITLE_H - 50
        x1 = max(max(e["pos"][0] + e["size"][0] for e in members) + 20, x0 + group_title_width(g.title))
        y1 = max(e["pos"][1] + e["size"][1] for e in members) + 20
        ui_groups.append({"title": g.title, "bounding": [x0, y0, x1 - x0, y1 - y0], "color": g.color,
                          "font_size": 24, "flags": {}})

    return {
        "last_node_id": max(by_id) if by_id else 0,
        "last_link_id": len(links),
        "nodes": sorted(ui_nodes, key=lambda e: e["id"]),
        "links": links,
        "groups": ui_groups,
        "config": {},
        "extra": {"ds": {"scale": 0.6, "offset": [20, 120]}, **(extra or {})},
        "version": 0.4,
    }


GROUP_PAD, GROUP_HEAD = 20, TITLE_H + 50  # a group's box around its members (see build_ui)


def group_title_width(title: str, font_size: int = 24) -> float:
    """A generous width of a group's title as the frontends draw it (sans-serif, ``font_size`` px), plus margins:
    the group is made at least this wide so that its title stays inside it."""
    return round(0.6 * font_size * len(title)) + 24


def stack_layout(nodes: list[Node], info: dict, groups: list[Group] = (), *, top: float = 20, left: float = 20,
                 gap_x: float = 60, gap_y: float = 40) -> list[Node]:
    """Positions for ``nodes`` so that nothing overlaps: ``pos = (column, order)`` is read as a column index and
    an order within the column (smaller first); each node gets its size (``min_node_size``, or ``size`` where
    larger) and is stacked below the one before it in its column. Columns are as wide as their widest node, side
    by side. A group's members start together below a shared top, under its title; other nodes of the columns a
    group spans go above or below the group's box. Returns new ``Node``s with canvas positions and sizes."""
    import dataclasses

    sizes = {}
    for n in nodes:
        if n.type in NOTE_TYPES:
            sizes[n.id] = tuple(n.size or (400, 200))
        else:
            need = min_node_size(info[n.type], n.title, n.inputs)
            sizes[n.id] = (max(need[0], n.size[0]), max(need[1], n.size[1])) if n.size else need
    columns = sorted({n.pos[0] for n in nodes})
    widths = {c: max(sizes[n.id][0] for n in nodes if n.pos[0] == c) for c in columns}
    for g in groups:  # a group as wide as its title: its last column grows
        cols = sorted({n.pos[0] for n in nodes if n.id in g.members})
        span = [c for c in columns if cols[0] <= c <= cols[-1]]
        have = sum(widths[c] for c in span) + gap_x * (len(span) - 1) + 2 * GROUP_PAD
        widths[span[-1]] += max(0, group_title_width(g.title) - have)
    xs, x = {}, left
    for c in columns:
        xs[c] = x
        x += widths[c] + gap_x
    group_of = {}
    for g in groups:
        for member in g.members:
            group_of[member] = g.title
    spans = {}
    for g in groups:
        cols = [n.pos[0] for n in nodes if n.id in g.members]
        spans[g.title] = [c for c in columns if min(cols) <= c <= max(cols)]
    remaining = {g.title: set(g.members) for g in groups}
    cursor = {c: top for c in columns}
    open_groups, bottom = {}, {}
    placed = {}
    pending = sorted(nodes, key=lambda n: (n.pos[1], n.pos[0]))
    while pending:
        for n in pending:
            col, g = n.pos[0], group_of.get(n.id)
            if any(col in spans[t] and t != g for t in open_groups):
                continue  # the column is inside another group's box until that group closes
            break
        else:
            raise BuildError("stack_layout: groups that interleave in one column cannot be laid out")
        pending.remove(n)
        if g is not None and g not in open_groups:
            start = max(cursor[c] for c in spans[g])
            open_groups[g] = start
            for c in spans[g]:
                cursor[c] = start + GROUP_HEAD - TITLE_H
        w, h = sizes[n.id]
        y = cursor[col] + TITLE_H
        placed[n.id] = dataclasses.replace(n, pos=(xs[col], y), size=(w, h))
        cursor[col] = y + h + gap_y
        if g is not None:
            bottom[g] = max(bottom.get(g, 0), y + h)
            remaining[g].discard(n.id)
            if not remaining[g]:
                del open_groups[g]
                for c in spans[g]:
                    cursor[c] = bottom[g] + GROUP_PAD + gap_y
    return [placed[n.id] for n in nodes]


def set_widgets(workflow: dict, info: dict, changes: dict) -> dict:
    """Set widget values of a UI-format workflow by input name: ``changes = {node_id: {input: value}}``.
    Changes ``workflow`` in place and returns it; unknown nodes or widget names are errors."""
    by_id = {str(n["id"]): n for n in workflow["nodes"]}
    for node_id, values in changes.items():
        node = by_id.get(str(node_id))
        if node is None:
            raise BuildError(f"no node {node_id} in the workflow")
        layout = widget_layout(info[node["type"]])
        names = [s.name if s.serialized else None for s in layout]
        stored = node.setdefault("widgets_values", [])
        for name, value in values.items():
            if name not in names:
                raise BuildError(f"node {node_id} ({node['type']}) has no widget '{name}'")
            index = names.index(name)
            while len(stored) <= index:
                stored.append(default_value(layout[len(stored)].spec))
            stored[index] = value
    return workflow


def _intersect(a, b) -> bool:
    """Whether two ``[x, y, w, h]`` boxes share any area (touching edges do not count)."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _inside(a, b) -> bool:
    return b[0] <= a[0] and b[1] <= a[1] and a[0] + a[2] <= b[0] + b[2] and a[1] + a[3] <= b[1] + b[3]


def layout_problems(nodes: list[dict], groups: list[dict], group_title_h: float = 34.0) -> list[str]:
    """What overlaps on a canvas. ``nodes``: ``{"name", "box": [x, y, w, h]}`` with the title bar included;
    ``groups``: ``{"name", "box"}`` (the title band is the top ``group_title_h`` px of the box). A node must not
    share area with another node; it lies either wholly inside a group, below its title band, or wholly outside
    it; two groups nest or do not touch."""
    problems = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            if _intersect(a["box"], b["box"]):
                problems.append(f"node {a['name']} overlaps node {b['name']}")
        for g in groups:
            box = g["box"]
            if not _intersect(a["box"], box):
                continue
            body = [box[0], box[1] + group_title_h, box[2], box[3] - group_title_h]
            if not _inside(a["box"], body):
                where = "the title of group" if _inside(a["box"], box) else "the edge of group"
                problems.append(f"node {a['name']} overlaps {where} {g['name']!r}")
    for i, g in enumerate(groups):
        for h in groups[i + 1:]:
            if _intersect(g["box"], h["box"]) and not (_inside(g["box"], h["box"]) or _inside(h["box"], g["box"])):
                problems.append(f"group {g['name']!r} overlaps group {h['name']!r}")
    return problems
