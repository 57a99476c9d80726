"""Node definitions as the ComfyUI frontend sees them, and the frontend's rules for widgets.

``object_info(...)`` builds from the live ``NODE_CLASS_MAPPINGS`` what ``GET /object_info`` serves (the classic
``INPUT_TYPES`` API and, on newer hosts, the V3 schema's V1 view). ``widget_layout(info)`` says which entries a
UI-format workflow stores in a node's ``widgets_values``, in order. The rules, as both the 2024-03 frontend
(``web/scripts/app.js``, ``widgets.js``, ``extensions/core/uploadImage.js``) and the current frontend apply them:

* every input whose type is a widget type (a list of options = COMBO, ``INT``, ``FLOAT``, ``STRING``,
  ``BOOLEAN``) makes one widget, in the order of ``required`` then ``optional``; socket types (``MODEL``,
  ``IMAGE``, ...) make no widget;
* an ``INT`` input named ``seed`` or ``noise_seed``, or with ``control_after_generate`` in its options, is followed
  by a "control after generate" widget (``fixed``/``increment``/``decrement``/``randomize``) that is stored in
  ``widgets_values`` but never sent to the server; a COMBO with ``control_after_generate`` gets that control and a
  filter-list text widget;
* a required ``image`` input with ``image_upload`` (LoadImage) gets an ``upload`` button at the end of the
  required inputs, stored as the string ``"image"``.

Inputs with ``forceInput`` are treated as sockets (what the current frontend does; the 2024-03 frontend kept a
hidden widget value for them). No stock node used by this pack has one.
"""
from __future__ import annotations

from dataclasses import dataclass

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_NAMES = ("seed", "noise_seed")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize", "increment-wrap")
# Frontend-only node types: never sent to the server.
VIRTUAL_NODES = ("Note", "MarkdownNote", "PrimitiveNode", "Reroute")


def _call(value):
    return value() if callable(value) else value


def node_info(name: str, cls, display_name: str | None = None) -> dict:
    """The ``GET /object_info`` entry of one node class."""
    if hasattr(cls, "GET_NODE_INFO_V1"):  # V3 schema (comfy_api.latest), newer hosts only
        return cls.GET_NODE_INFO_V1()
    inputs = cls.INPUT_TYPES()
    returns = tuple(cls.RETURN_TYPES)
    info = {
        "input": inputs,
        "input_order": {section: list(value) for section, value in inputs.items()},
        "output": returns,
        "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(returns))),
        "output_name": tuple(getattr(cls, "RETURN_NAMES", returns)),
        "name": name,
        "display_name": display_name or name,
        "description": getattr(cls, "DESCRIPTION", ""),
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    }
    return info


def object_info(mappings: dict | None = None, display_names: dict | None = None) -> dict:
    """``{node type: info}`` for every registered node (default: the live ``nodes`` module of the host)."""
    if mappings is None:
        import nodes
        mappings, display_names = nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS
    display_names = display_names or {}
    return {name: node_info(name, cls, display_names.get(name)) for name, cls in mappings.items()}


def input_type(spec) -> str:
    """``"COMBO"`` for a list of options, else the type string of an input spec ``(type, options)``."""
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    if isinstance(kind, (list, tuple)):
        return "COMBO"
    return str(kind)


def input_options(spec) -> dict:
    if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict):
        return spec[1]
    return {}


def combo_values(spec) -> list | None:
    """The allowed values of a COMBO input (list form, or the newer ``("COMBO", {"options": [...]})`` form)."""
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    if isinstance(kind, (list, tuple)):
        return list(kind)
    if kind == "COMBO":
        return list(input_options(spec).get("options", []))
    return None


def is_widget(spec) -> bool:
    return input_type(spec) in WIDGET_TYPES and not input_options(spec).get("forceInput")


def ordered_inputs(info: dict) -> list[tuple[str, object, str]]:
    """``(name, spec, section)`` for the required then optional inputs, in the node's declared order."""
    out = []
    inputs = info.get("input", {})
    order = info.get("input_order") or {}
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        names = [n for n in order.get(section, []) if n in specs] or list(specs)
        names += [n for n in specs if n not in names]
        out.extend((name, specs[name], section) for name in names)
    return out


@dataclass(frozen=True)
class Slot:
    """One entry of ``widgets_values``: ``kind`` is ``value`` (sent to the server as input ``name``),
    ``control`` (control after generate), ``filter`` (a combo's filter list) or ``upload`` (upload button)."""
    name: str
    kind: str = "value"
    spec: object = None

    @property
    def serialized(self) -> bool:
        return self.kind == "value"


def has_control(name: str, spec) -> bool:
    kind, opts = input_type(spec), input_options(spec)
    if kind == "INT":
        return bool(opts.get("control_after_generate")) or name in SEED_NAMES
    if kind == "COMBO":
        return bool(opts.get("control_after_generate"))
    return False


def widget_layout(info: dict) -> list[Slot]:
    """The entries of ``widgets_values`` of a node of this type, in order (see the module docstring)."""
    slots, upload = [], False
    entries = ordered_inputs(info)
    for i, (name, spec, section) in enumerate(entries):
        if is_widget(spec):
            slots.append(Slot(name, "value", spec))
            if has_control(name, spec):
                slots.append(Slot("control_after_generate", "control"))
                if input_type(spec) == "COMBO":
                    slots.append(Slot("control_filter_list", "filter"))
        if section == "required" and name == "image" and input_options(spec).get("image_upload") is True:
            upload = True
        last_required = i + 1 == len(entries) or entries[i + 1][2] != "required"
        if section == "required" and last_required and upload:
            slots.append(Slot("upload", "upload"))
            upload = False
    return slots


def socket_inputs(info: dict) -> list[tuple[str, str, bool]]:
    """``(name, type, optional)`` of the inputs that are sockets (no widget)."""
    return [(name, input_type(spec), section == "optional") for name, spec, section in ordered_inputs(info)
            if not is_widget(spec)]


def spec_of(info: dict, name: str):
    for section in ("required", "optional"):
        specs = info.get("input", {}).get(section) or {}
        if name in specs:
            return specs[name]
    return None


def default_value(spec):
    """What the frontend puts in a fresh widget: the declared default, else the first option / min / 0 / ""."""
    opts = input_options(spec)
    values = combo_values(spec)
    if "default" in opts:
        return opts["default"]
    if values is not None:
        return values[0] if values else None
    kind = input_type(spec)
    if kind in ("INT", "FLOAT"):
        return opts.get("min", 0) if opts.get("min", 0) > 0 else 0
    return {"STRING": "", "BOOLEAN": False}.get(kind)


def types_compatible(output_type: str, input_type_: str) -> bool:
    """Whether a link from an output of ``output_type`` may feed an input of ``input_type_`` (the frontend's rule:
    equal, ``*`` on either side, or a comma-separated list on either side that shares a type)."""
    if output_type == input_type_ or "*" in (output_type, input_type_):
        return True
    a = {t.strip() for t in str(output_type).split(",")}
    b = {t.strip() for t in str(input_type_).split(",")}
    return bool(a & b)


def describe_allowed(spec) -> str:
    """A short human description of what a widget input accepts."""
    kind, opts = input_type(spec), input_options(spec)
    values = combo_values(spec)
    if values is not None:
        shown = ", ".join(repr(v) for v in values[:20])
        more = f", … ({len(values)} in all)" if len(values) > 20 else ""
        return f"one of [{shown}{more}]" if values else "one of [] (no choices available: the folder is empty)"
    if kind in ("INT", "FLOAT"):
        lo, hi = opts.get("min"), opts.get("max")
        rng = f" from {lo} to {hi}" if lo is not None and hi is not None else \
              f" ≥ {lo}" if lo is not None else f" ≤ {hi}" if hi is not None else ""
        return f"{'an integer' if kind == 'INT' else 'a number'}{rng}"
    if kind == "BOOLEAN":
        return "true or false"
    if kind == "STRING":
        return "a text"
    return f"a link from an output of type {kind}"
