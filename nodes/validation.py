"""Every widget value a node of this pack receives is checked before any model work, by one rule for all nodes.

ComfyUI's own checks are not enough: JSON lets NaN and ±inf through its min/max comparisons (every comparison with
NaN is false), the 2024-03 host checks no optional input at all, and an input that a node's ``VALIDATE_INPUTS``
names loses ComfyUI's combo-list check (on current hosts also its type and min/max checks). So each node gets a
``VALIDATE_INPUTS`` whose signature names *every* widget input (INT, FLOAT, STRING, BOOLEAN and combo lists), and
that checks each value itself: type, finiteness, min/max and the combo list, plus the node's own rules
(``problems``: windows, box lists, words, …). Socket inputs (MODEL, IMAGE, UG_GUIDANCE, …) are left to ComfyUI.

A value that comes from a linked node is not known at validation time (ComfyUI passes None); the same checks run
again when the node runs, on the values it received, before it loads or computes anything.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers

from .errors import GuidanceInputError

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
_SHOWN_CHOICES = 12


def widget_specs(input_types: dict) -> dict:
    """``{name: (type, options)}`` of the widget inputs (required and optional) of an ``INPUT_TYPES()`` result."""
    specs = {}
    for section in ("required", "optional"):
        for name, spec in (input_types.get(section) or {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES:
                specs[name] = (kind, options)
    return specs


def _choices_text(choices) -> str:
    shown = ", ".join(repr(c) for c in list(choices)[:_SHOWN_CHOICES])
    more = len(choices) - _SHOWN_CHOICES
    return shown + (f", … ({more} more)" if more > 0 else "")


def _number_problem(value, kind: str, options: dict):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"{value!r} is not a number; enter a {'whole ' if kind == 'INT' else ''}number"
    value = float(value)
    low, high = options.get("min"), options.get("max")
    span = f" between {low:g} and {high:g}" if low is not None and high is not None else ""
    if math.isnan(value):
        return f"is NaN (not a number); enter a number{span}"
    if math.isinf(value):
        return f"is {'+' if value > 0 else '-'}infinite; enter a finite number{span}"
    if kind == "INT" and not value.is_integer():
        return f"{value:g} is not a whole number"
    if low is not None and value < low:
        return f"{value:g} is below its minimum {low:g}; enter a number{span}"
    if high is not None and value > high:
        return f"{value:g} is above its maximum {high:g}; enter a number{span}"
    return None


def value_problem(value, kind, options: dict):
    """What is wrong with one widget value, or None. ``value`` None (not known yet) is not judged."""
    if value is None:
        return None
    if isinstance(kind, (list, tuple)):
        if isinstance(value, (str, int, float, bool)) and value in kind and not isinstance(value, bool):
            return None
        return (f"{value!r} is not one of its choices ({_choices_text(kind)}); pick one from the list (a workflow "
                f"saved with another version or other model files may carry a value that no longer exists)")
    if kind in ("INT", "FLOAT"):
        return _number_problem(value, kind, options)
    if kind == "STRING" and not isinstance(value, str):
        return f"{value!r} is not text"
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{value!r} is not true or false"
    return None


def widget_problems(input_types: dict, values: dict, list_problem=None, final: bool = False) -> dict:
    """``{name: problem}`` for every widget value in ``values`` that breaks its type, range or list.

    ``list_problem(name, value)``: a more helpful message for a value that is not in a combo's list, or None.
    ``final``: the values the node runs with, where None (JSON null) is no value."""
    problems = {}
    for name, (kind, options) in widget_specs(input_types).items():
        if final and name in values and values[name] is None:
            problems[name] = "has no value (null); give it one"
            continue
        problem = value_problem(values.get(name), kind, options)
        if problem and list_problem is not None and isinstance(kind, (list, tuple)):
            problem = list_problem(name, values.get(name)) or problem
        if problem:
            problems[name] = problem
    return problems


def legacy_mapped(cls, values: dict) -> dict:
    """``values`` with the values an earlier release saved for an input replaced by what they mean now
    (``LEGACY_VALUES``: input name → {old value: new value}, e.g. a BOOLEAN that became a combo)."""
    legacy = getattr(cls, "LEGACY_VALUES", None) or {}
    out = dict(values)
    for name, mapping in legacy.items():
        value = out.get(name)
        if isinstance(value, (bool, int, float, str)) and value in mapping and \
                any(type(value) is type(k) and value == k for k in mapping):
            out[name] = mapping[value]
    return out


def check(cls, values: dict, final: bool = False) -> list:
    """Every problem with ``values`` for node class ``cls``: the widget rules, then the node's own ``problems``
    (run only on values that passed the widget rules; the others are passed as None, i.e. not known).
    ``final``: the values the node runs with (at validation, None means not known yet)."""
    input_types = cls.INPUT_TYPES()
    values = legacy_mapped(cls, values)
    bad = widget_problems(input_types, values, getattr(cls, "list_problem", None), final)
    found = [f"input '{name}': {problem}" for name, problem in bad.items()]
    known = {k: (None if k in bad else v) for k, v in values.items()}
    own = getattr(cls, "problems", None)
    if own is not None:
        found += [p for p in own(known) if p]
    return found


def raise_problems(node: str, problems: list) -> bool:
    """True when there is none; else one error naming the node and listing every problem.

    ComfyUI shows a message *returned* by VALIDATE_INPUTS once for every input the check read; an error raised
    while validating a node is recorded once, for that node, and the validation of the other nodes goes on, so one
    queue still lists every mistake."""
    found = [p for p in problems if p]
    if found:
        raise GuidanceInputError(f"{node}: " + "; ".join(found))
    return True


class _ValidateEveryWidget:
    """The ``VALIDATE_INPUTS`` of a checked node: a function whose signature names every widget input of the class
    it is read from (ComfyUI reads the signature to decide which values to pass)."""

    def __get__(self, instance, owner):
        cached = owner.__dict__.get("_ug_validate_inputs")
        if cached is not None:
            return cached

        def VALIDATE_INPUTS(**values):
            return raise_problems(owner.NAME, check(owner, values))

        names = list(widget_specs(owner.INPUT_TYPES()))
        VALIDATE_INPUTS.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for n in names])
        VALIDATE_INPUTS.__qualname__ = f"{owner.__name__}.VALIDATE_INPUTS"
        setattr(owner, "_ug_validate_inputs", VALIDATE_INPUTS)
        return VALIDATE_INPUTS


def _checked_function(function):
    signature = inspect.signature(function)

    @functools.wraps(function)
    def run(self, *args, **kwargs):
        bound = signature.bind_partial(self, *args, **kwargs)
        values = dict(bound.arguments)
        values.pop(next(iter(signature.parameters)), None)  # self
        for name, param in signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                values.update(values.pop(name, {}))
        raise_problems(type(self).NAME, check(type(self), values, final=True))
        if getattr(type(self), "LEGACY_VALUES", None):
            kwargs = legacy_mapped(type(self), kwargs)
        return function(self, *args, **kwargs)

    run.ug_checked = True
    return run


class CheckedNode:
    """Base of every node of the pack: ``VALIDATE_INPUTS`` checks every widget value (see the module doc), and the
    node's function checks the values it is called with again before doing anything.

    A node adds its own rules by overriding ``problems(cls, values) -> list of "input '…': …" strings``; a value
    not known at validation time is None there. ``FILE_INPUTS`` names the combos that list model files (input
    name → ``model_files`` key)."""

    FILE_INPUTS: dict = {}
    LEGACY_VALUES: dict = {}  # input name → {value an earlier release saved: what it means now}

    VALIDATE_INPUTS = _ValidateEveryWidget()

    @classmethod
    def problems(cls, values: dict) -> list:
        return []

    @classmethod
    def list_problem(cls, name: str, value):
        """What to say of a value not in the list of combo ``name`` (None: the generic message). A model file
        that is not there is told which folders are searched."""
        if name in cls.FILE_INPUTS and isinstance(value, str):
            from . import model_files
            return model_files.missing_file(cls.FILE_INPUTS[name], value)
        return None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = getattr(cls, "FUNCTION", None)
        function = cls.__dict__.get(name) if name else None
        if function is not None and not getattr(function, "ug_checked", False):
            setattr(cls, name, _checked_function(function))
