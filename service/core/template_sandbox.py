"""The sandbox a client's chat template runs in: transformers' chat-template environment (same
options, filters and globals) with every value the template builds capped at a number of
characters. Operations that could multiply a value in one C call (`*`, `**`, `%`, `format`, `join`,
`replace`, `indent`, `center`, `tojson`...) are estimated before they run: a trace function cannot
interrupt a C call. Time is bounded elsewhere (`service.core.client_templates`)."""

from __future__ import annotations

import functools
import json
import re
import string
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, TypeVar

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

T = TypeVar("T")
_DIGITS = re.compile(r"\d+")
_NESTED = re.compile(r"\{[^{}]*\}")  # a field nested in a format spec: its width is an argument
_PERCENT = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?[diouxXeEfFgGcrsab%]")
_FORMATTER = string.Formatter()
_WIDTH_METHODS = frozenset({"ljust", "rjust", "center", "zfill", "expandtabs"})


class TemplateBudgetExceeded(BaseException):
    """Raised inside a client template's render once it is over budget. A BaseException, as
    KeyboardInterrupt is: no `except Exception` in Jinja or transformers may swallow it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant masks): rendered as its body."""

    tags = {"generation"}  # noqa: RUF012 (Jinja's own attribute)

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return list(parser.parse_statements(("name:endgeneration",), drop_needle=True))


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator with `~` (string concatenation) going through the size check."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """transformers' chat-template sandbox (same options, filters and globals), with every value the
    template builds and its output capped at `max_chars` characters."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BoundedCodeGenerator

    def __init__(self, max_chars: int) -> None:
        super().__init__(
            trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
        )
        self.max_chars = max_chars
        self.filters["tojson"] = _tojson
        self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        """`*`, `**`, `+`, `%` with their result's size estimated first (and checked after)."""
        if operator == "*":
            self._check_repeat(left, right)
            self._check_repeat(right, left)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            self._within(right * left.bit_length() // 4, "a number")
        elif operator == "%" and isinstance(left, str):
            self._check_format(left, right)
        return self.bounded(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        """A call from the template, its arguments and result checked against the cap."""
        if __obj is not safe_range:
            __self._check_arguments(args, kwargs)
        target = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
        receiver = getattr(target, "__self__", None)
        if isinstance(receiver, str):
            __self._check_str_method(receiver, getattr(target, "__name__", ""), args, kwargs)
        return __self.bounded(super().call(__context, __obj, *args, **kwargs))

    def bounded_concat(self, parts: Iterable[Any]) -> str:
        """`a ~ b`: Jinja's string concatenation, its result checked."""
        return self.bounded("".join(map(str, parts)))

    def bounded(self, value: T) -> T:
        """`value`, refused when it is larger than the cap (a string, a collection or a number)."""
        if isinstance(value, str | list | tuple | dict):
            self._within(len(value), "a value")
        elif isinstance(value, int):
            self._within(value.bit_length() // 4, "a number")
        return value

    def _within(self, size: int, what: str) -> None:
        if size > self.max_chars:
            raise TemplateBudgetExceeded(
                f"built {what} over {self.max_chars:,} characters (GATEWAY_MAX_PROMPT_CHARS)"
            )

    def _check_repeat(self, sequence: Any, times: Any) -> None:
        if isinstance(sequence, str | list | tuple) and isinstance(times, int):
            self._within(len(sequence) * times, "a value")
        elif isinstance(sequence, int) and isinstance(times, int):
            self._within((sequence.bit_length() + times.bit_length()) // 4, "a number")

    def _check_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool):
                self._within(abs(value), "a value")

    def _check_format(self, template: str, values: Any, field: str = "%") -> None:
        """`template % values` (`format`, `str.format`): room for every field's width and precision
        (written, or taken from an argument) and for the longest value in every field."""
        spec = _format_fields(template) if field == "{" else _percent_fields(template)
        if spec is None:
            return  # malformed: the real call refuses it before building anything
        fields, written, taken = spec
        if isinstance(values, dict):
            values = list(values.values())
        items = values if isinstance(values, tuple | list) else [values]
        longest = max((len(str(item)) for item in items), default=0)
        widest = max((abs(item) for item in items if _is_int(item)), default=0) if taken else 0
        self._within(len(template) + written + fields * longest + taken * widest, "a value")

    def _check_str_method(self, text: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if name in ("format", "format_map"):
            values = [*args, *kwargs.values()]
            if name == "format_map" and args and isinstance(args[0], dict):
                values = list(args[0].values())
            self._check_format(text, values, "{")
        elif name == "join" and args and isinstance(args[0], list | tuple):
            self._within(len(text) * len(args[0]) + sum(len(str(item)) for item in args[0]), "a value")
        elif name == "replace" and len(args) >= 2:
            self._check_replace(text, args[0], args[1])
        elif name in _WIDTH_METHODS and args and isinstance(args[0], int):
            self._within(len(text) * max(1, args[0]) if name == "expandtabs" else args[0], "a value")

    def _check_replace(self, text: str, old: Any, new: Any) -> None:
        if isinstance(old, str) and isinstance(new, str):
            count = len(text) + 1 if not old else text.count(old)
            self._within(len(text) + count * len(new), "a value")

    def _bounded_filter(self, name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        """A filter with its arguments checked (estimates for the ones that multiply a value) and
        its result checked."""
        skip = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0  # context or environment

        @functools.wraps(f)
        def bounded_filter(*args: Any, **kwargs: Any) -> Any:
            value, rest = (args[skip], args[skip + 1 :]) if len(args) > skip else (None, ())
            self._check_arguments(rest, kwargs)
            if name == "join" and value is not None:
                value = self._bounded_items(value)
                args = (*args[:skip], value, *rest)
                separator = str(rest[0]) if rest else str(kwargs.get("d", ""))
                self._within(len(separator) * len(value) + sum(len(str(item)) for item in value), "a value")
            elif name == "replace" and isinstance(value, str) and len(rest) >= 2:
                self._check_replace(value, rest[0], rest[1])
            elif name == "format" and isinstance(value, str):
                self._check_format(value, [*rest, *kwargs.values()])
            elif name in ("indent", "center", "tojson") and value is not None:
                self._check_widening(name, value, rest, kwargs)
            elif name == "sum" and not isinstance(
                kwargs.get("start", rest[1] if len(rest) > 1 else 0), int | float
            ):
                raise TemplateBudgetExceeded("summed values other than numbers (only numbers are summed)")
            return self.bounded(f(*args, **kwargs))

        return bounded_filter

    def _bounded_items(self, value: Any) -> list[Any]:
        if isinstance(value, str | list | tuple | dict):
            return list(value)
        items = []
        for item in value:  # a generator: taken one by one, no more than the cap
            items.append(item)
            self._within(len(items), "a value")
        return items

    def _check_widening(self, name: str, value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """`indent`, `center` and `tojson` grow their input by a width: estimate the result."""
        key = {"indent": "width", "center": "width", "tojson": "indent"}[name]
        width = rest[0] if rest else kwargs.get(key)
        if isinstance(width, str):
            width = len(width)
        if not isinstance(width, int):
            return
        text = str(value)
        lines = text.count("\n") + 1 if name == "indent" else len(text)
        self._within(len(text) + lines * width, "a value")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _spec_widths(spec: str) -> int:
    """The characters a format spec's numbers (width, precision) can add; refused past 9 digits."""
    numbers = _DIGITS.findall(spec)
    if any(len(number) > 9 for number in numbers):
        raise TemplateBudgetExceeded("formatted a value with a width of over 9 digits")
    return sum(map(int, numbers))


def _format_fields(template: str) -> tuple[int, int, int] | None:
    """`str.format`'s fields: their count, the widths written in their specs, and how many widths
    come from arguments (`{:{}}`); None when the template is malformed."""
    fields = written = taken = 0
    try:
        for _, name, spec, _ in _FORMATTER.parse(template):
            if name is None:
                continue
            fields += 1
            taken += spec.count("{") if spec else 0
            written += _spec_widths(_NESTED.sub("", spec or ""))
    except ValueError:
        return None
    return fields, written, taken


def _percent_fields(template: str) -> tuple[int, int, int]:
    """`%`-formatting's fields: their count, the widths and precisions written, and how many are
    taken from arguments (`%*s`, `%.*f`)."""
    fields = written = taken = 0
    for width, precision in _PERCENT.findall(template):
        fields += 1
        for number in (width, precision):
            if number == "*":
                taken += 1
            elif number:
                written += _spec_widths(number)
    return fields, written, taken


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    """transformers' `tojson`: no HTML escaping, json.dumps's options."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)
