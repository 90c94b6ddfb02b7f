"""Resource limits for untrusted chat templates: bounded loops, sequence sizes and output length.

The jinja sandbox keeps templates away from Python internals; these limits keep them from exhausting
time or memory with ``'x' * 10**9``, ``'a'.ljust(10**9)``, ``'%1000000000d' % 1`` or loops nested
over ``range(100000)``. Every breach raises jinja's SecurityError (the caller reports a TokenizerError).
"""

from __future__ import annotations

import contextvars
import functools
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jinja2.nodes
from jinja2.exceptions import SecurityError

MAX_ITEMS = 1_000_000  # longest string or list a template may build, or ask a method or filter to build
MAX_LOOP_STEPS = 1_000_000  # for-loop iterations per render, all loops together
MAX_OUTPUT_CHARS = 16_000_000
MAX_EXPONENT = 4096
_WIDE_FORMAT = re.compile(r"\d{7,}")  # a width or precision of a million or more in a format string
_SEQUENCES = (str, bytes, list, tuple)

_steps_left: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("template_steps", default=None)


def _refuse(what: str) -> SecurityError:
    return SecurityError(f"the chat template {what}, beyond modelkin's template limits")


def _check_size(value: Any, what: str) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_ITEMS:
        raise _refuse(f"{what} {value}")
    if isinstance(value, _SEQUENCES) and len(value) > MAX_ITEMS:
        raise _refuse(f"{what} of {len(value)} items")


def _check_format(fmt: Any) -> None:
    if isinstance(fmt, str) and _WIDE_FORMAT.search(fmt):
        raise _refuse("formats with a width or precision of 7+ digits")


def _binop_guard(operator: str, left: Any, right: Any) -> None:
    if operator == "*":
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, _SEQUENCES) and isinstance(count, int) and len(seq) * count > MAX_ITEMS:
                raise _refuse(f"repeats a sequence {count} times")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > MAX_EXPONENT:
            raise _refuse(f"raises to the power {right}")
    elif operator == "%" and isinstance(left, str):
        _check_format(left)
        for arg in right if isinstance(right, tuple) else (right,):
            _check_size(arg, "formats with the number")


def count_steps(iterable: Iterable[Any]) -> Iterator[Any]:
    """Iterate ``iterable``, charging each step to the current render's loop budget."""
    left = _steps_left.get()
    for item in iterable:
        if left is not None:
            left[0] -= 1
            if left[0] < 0:
                raise _refuse(f"ran more than {MAX_LOOP_STEPS} loop iterations")
        yield item


def _limited_filter(func: Callable[..., Any]) -> Callable[..., Any]:
    from jinja2.utils import _PassArg

    first = 2 if _PassArg.from_obj(func) is not None else 1  # (context,) value, then the arguments

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if func.__name__ == "do_format" and len(args) >= first:
            _check_format(args[first - 1])
        for arg in (*args[first:], *kwargs.values()):
            _check_size(arg, f"passes the filter {func.__name__.removeprefix('do_')} the argument")
        return func(*args, **kwargs)

    return wrapper


class LimitedSandbox:
    """Mixin for a jinja SandboxedEnvironment: sizes checked before they are built, loops counted."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.filters = {name: _limited_filter(f) for name, f in self.filters.items()}  # type: ignore[attr-defined]
        self.globals["__count_steps"] = count_steps  # type: ignore[attr-defined]

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _binop_guard(operator, left, right)
        return super().call_binop(context, operator, left, right)  # type: ignore[misc]

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: PYI063
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format on access
        bound_to = getattr(target, "__self__", None)
        if isinstance(bound_to, str) and getattr(target, "__name__", "") in ("format", "format_map"):
            _check_format(bound_to)
        for arg in (*args, *kwargs.values()):  # 'a'.ljust(10**9); a macro fed ever-doubling strings
            if isinstance(bound_to, _SEQUENCES) or isinstance(arg, _SEQUENCES):
                _check_size(arg, "passes the argument")
        return super().call(__context, __obj, *args, **kwargs)  # type: ignore[misc]

    def _parse(self, source: str, name: str | None, filename: str | None) -> jinja2.nodes.Template:
        tree = super()._parse(source, name, filename)  # type: ignore[misc]
        for loop in tree.find_all(jinja2.nodes.For):
            loop.iter = jinja2.nodes.Call(jinja2.nodes.Name("__count_steps", "load"), [loop.iter], [], None, None)
        return tree


def render_limited(template: Any, **context: Any) -> str:
    """Render with a fresh loop budget; stop once the output passes MAX_OUTPUT_CHARS."""
    token = _steps_left.set([MAX_LOOP_STEPS])
    try:
        parts, size = [], 0
        for chunk in template.generate(**context):
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                raise _refuse(f"wrote more than {MAX_OUTPUT_CHARS} characters")
            parts.append(chunk)
        return "".join(parts)
    finally:
        _steps_left.reset(token)


def check_namespace_value(value: Any) -> None:
    """namespace() attributes carry state across loop iterations: keep the sequences they hold bounded."""
    if isinstance(value, _SEQUENCES):
        _check_size(value, "stores a value")
