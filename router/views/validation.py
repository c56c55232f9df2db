"""Request bodies as pydantic models, and the one translation of pydantic's
`ValidationError` into `router.errors.BadRequest`.

Every body model derives from `Body`: strict types (no "1" for 1, no true for
1), fields the product does not use are accepted and ignored
(`extra="allow"`: `metadata`, `user`, `store`, `cache_control`, ...), and
`field_texts` gives the client-facing text of any error at one of its fields:

    class ChatCompletionBody(Body):
        field_texts = {"model": "'{param}' is required and must be a string"}

A text is either one string, used for every error at that field (wrong type,
missing, too short, ...), or a mapping from pydantic error type to text, "*"
for any other type (`{"missing": "max_tokens: field required"}`: only when it
is missing). `{param}` stands for the field's path in the body
(`messages[2].content`), `{name}` for the same path quoted when it has no index
(`'stream_options.include_usage'`, but `tools[0].name`). Errors without a text
of their own get a generic one by error type (`GENERIC_TEXTS`); a union chosen
by a field (`tagged`: content blocks by "type", messages by "role") names that
field and the values it takes.

`validate(model, body)` returns the model or raises BadRequest naming the
field (`param`). When several errors occur, the deepest one is reported (for a
union such as "a string or a list of parts", the member that got furthest says
best what is wrong), the first of equally deep ones otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Tag, ValidationError, model_validator
from pydantic_core import PydanticCustomError, core_schema

from kvrouter.router.errors import BadRequest

TEXT_ERROR = "kvrouter_text"
"""The pydantic error type of an error that carries its client-facing text (ctx "text")."""

GENERIC_TEXTS: Mapping[str, str] = {
    "missing": "{name} is required",
    "model_type": "{name} must be an object",
    "dict_type": "{name} must be an object",
    "list_type": "{name} must be an array",
    "tuple_type": "{name} must be an array",
    "string_type": "{name} must be a string",
    "int_type": "{name} must be an integer",
    "int_from_float": "{name} must be an integer",
    "int_parsing": "{name} must be an integer",
    "float_type": "{name} must be a number",
    "float_parsing": "{name} must be a number",
    "bool_type": "{name} must be a boolean",
    "none_required": "{name} must be null",
    "literal_error": "{name} must be {expected}",
    "string_too_short": "{name} must not be empty",
    "string_too_long": "{name} must be at most {max_length} characters",
    "too_short": "{name} must have at least {min_length} item(s)",
    "too_long": "{name} takes at most {max_length} items",
}
"""Texts by pydantic error type (pydantic's `ctx` keys fill the placeholders)."""

BODY_NOT_OBJECT = "the request body must be a JSON object"
TAG_CHARS = 80  # characters of an unsupported "type"/"role" value an error text repeats


def text_error(text: str, missing: bool = False) -> PydanticCustomError:
    """A pydantic error whose client-facing text is `text` ({param}/{name} placeholders).
    `missing`: it is about a field that is absent (its name is still part of `param`)."""
    return PydanticCustomError(TEXT_ERROR, "{text}", {"text": text, "missing": missing})


class Body(BaseModel):
    """Base of every request body model: strict, frozen, unknown fields kept and ignored.

    `field_texts`: {field name: text, or {pydantic error type: text}} (see the module docstring).
    """

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)
    field_texts: ClassVar[Mapping[str, str | Mapping[str, str]]] = {}

    @model_validator(mode="wrap")
    @classmethod
    def _use_field_texts(cls, data: Any, handler):
        try:
            return handler(data)
        except ValidationError as exc:
            if not cls.field_texts:
                raise
            raise _with_field_texts(exc, data, cls.field_texts) from None


def _with_field_texts(exc: ValidationError, data: Any, texts) -> ValidationError:
    line_errors = []
    for e in exc.errors(include_url=False):
        missing = _is_missing(e)
        path = data_path(data, e["loc"], missing)
        text = texts.get(path[0]) if len(path) == 1 else None
        if isinstance(text, Mapping):
            text = text.get(e["type"], text.get("*"))
        if text is not None and e["type"] != TEXT_ERROR:
            line_errors.append({"type": text_error(text, missing), "loc": path, "input": e["input"]})
        elif e["type"] == TEXT_ERROR:
            line_errors.append({"type": PydanticCustomError(TEXT_ERROR, "{text}", e["ctx"]), "loc": e["loc"],
                                "input": e["input"]})
        else:
            kept = {"type": e["type"], "loc": e["loc"], "input": e["input"]}
            if e.get("ctx"):
                kept["ctx"] = e["ctx"]
            line_errors.append(kept)
    return ValidationError.from_exception_data(exc.title, line_errors)


def _is_missing(e: Mapping) -> bool:
    return e["type"] == "missing" or (e["type"] == TEXT_ERROR and bool(e["ctx"].get("missing")))


def data_path(data: Any, loc: tuple, missing: bool = False) -> tuple[str | int, ...]:
    """The part of a pydantic error `loc` that names places in `data` (keys and
    indexes); union member labels and tags, which name no place, are left out. A
    missing field's name is kept (`missing`: the error is a "missing" one)."""
    path: list[str | int] = []
    obj = data
    for i, key in enumerate(loc):
        if isinstance(obj, dict) and isinstance(key, str) and key in obj:
            path.append(key)
            obj = obj[key]
        elif isinstance(obj, list) and isinstance(key, int) and 0 <= key < len(obj):
            path.append(key)
            obj = obj[key]
        elif missing and i == len(loc) - 1:
            path.append(key)
    return tuple(path)


def param_of(path: tuple[str | int, ...]) -> str | None:
    """`("messages", 2, "content")` as "messages[2].content"; None for the body itself."""
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out or None


def _render(template: str, param: str | None, ctx: Mapping[str, Any] | None = None) -> str:
    """`template` with {param} and {name} filled in; with `ctx`, its keys too (our
    own texts are not formatted further: they may hold braces)."""
    param = param or "body"
    text = template.replace("{param}", param).replace("{name}", param if "[" in param else f"'{param}'")
    return text if ctx is None else text.format_map(_Keep(ctx))


class _Keep(dict):
    """str.format_map mapping that leaves unknown placeholders as they are."""

    def __missing__(self, key):
        return "{" + key + "}"


def bad_request(exc: ValidationError, data: Any) -> BadRequest:
    """The BadRequest for `exc`, raised while validating `data`: its text and
    `param` (the field's path) from the deepest error (see the module docstring)."""
    errors = exc.errors(include_url=False)
    paths = [data_path(data, e["loc"], _is_missing(e)) for e in errors]
    best = max(range(len(errors)), key=lambda i: (len(paths[i]), -i))
    e, path = errors[best], paths[best]
    param = param_of(path)
    if e["type"] == TEXT_ERROR:
        return BadRequest(_render(e["ctx"]["text"], param), param=param)
    if e["type"] in ("model_type", "dict_type") and not path:
        return BadRequest(BODY_NOT_OBJECT)
    if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return _tag_error(e, path)
    template = GENERIC_TEXTS.get(e["type"])
    if template is None:
        return BadRequest(f"{param or 'the request body'}: {e['msg']}", param=param)
    return BadRequest(_render(template, param, e.get("ctx") or {}), param=param)


def _tag_error(e: dict, path: tuple) -> BadRequest:
    """A union chosen by a field (`tagged`) whose value is missing or not one of the choices."""
    ctx = e.get("ctx") or {}
    field = str(ctx.get("discriminator", "type")).strip("'").removesuffix("()")
    if not isinstance(e["input"], dict):
        param = param_of(path)
        return BadRequest(_render(GENERIC_TEXTS["model_type"], param), param=param)
    param = param_of(path + (field,))
    if e["type"] == "union_tag_not_found":
        return BadRequest(f"{param} is required", param=param)
    tag = str(ctx.get("tag", "")).partition("=")[2][:TAG_CHARS]
    expected = ", ".join(f"'{t.strip().strip(chr(39)).partition('=')[2]}'"
                         for t in str(ctx.get("expected_tags", "")).split(",") if "=" in t)
    return BadRequest(f"{param}: '{tag}' is not supported here (expected one of {expected})", param=param)


B = TypeVar("B", bound=BaseModel)


def validate(model: type[B], body: Any) -> B:
    """`body` (decoded JSON) validated as `model`; raises BadRequest naming the field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise bad_request(exc, body) from exc


# -- annotations shared by the body models ----------------------------------------------------

@dataclass(frozen=True)
class Between:
    """A number field's range, inclusive: validation (text "'{param}' must be between
    lo and hi, got v") and the JSON schema's minimum/maximum. NaN is out of range."""

    lo: float
    hi: float

    def __get_pydantic_core_schema__(self, source, handler):
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema, handler):
        out = handler(schema)
        out.update(minimum=self.lo, maximum=self.hi)
        return out

    def _check(self, value):
        if not (self.lo <= value <= self.hi) or (isinstance(value, float) and math.isnan(value)):
            shown = int(value) if isinstance(value, float) and value.is_integer() else value
            raise text_error(f"{{name}} must be between {self.lo} and {self.hi}, got {shown}")
        return value


@dataclass(frozen=True)
class Only:
    """A field that takes one value only (when given): `text` otherwise; the JSON
    schema lists that value (`enum`)."""

    value: Any
    text: str

    def __get_pydantic_core_schema__(self, source, handler):
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema, handler):
        out = handler(schema)
        out["enum"] = [self.value]
        return out

    def _check(self, value):
        if value != self.value:
            raise text_error(self.text)
        return value


def integer(lo: int, hi: int):
    """An integer field in [lo, hi]."""
    return Annotated[int, Between(lo, hi)]


def number(lo: float, hi: float):
    """A number field (integer or float) in [lo, hi]."""
    return Annotated[float, Between(lo, hi)]


def tagged(field: str, choices: Mapping[str, type], default: str | None = None, other: type | None = None):
    """A union of models chosen by the value of `field` (Anthropic content blocks by
    "type", messages by "role"). `default`: the choice when the field is absent;
    `other`: the model for any other value (hosted tools we skip), else such a
    value is an error naming the field and the values expected."""

    def choose(value):
        if not isinstance(value, dict):
            return None
        kind = value.get(field, default)
        if kind is None:
            return None
        if isinstance(kind, str) and kind in choices:
            return f"{field}={kind}"
        return f"{field}=*" if other is not None else f"{field}={kind}"

    choose.__name__ = field
    members = [Annotated[m, Tag(f"{field}={k}")] for k, m in choices.items()]
    if other is not None:
        members.append(Annotated[other, Tag(f"{field}=*")])
    return Annotated[Union[tuple(members)], Discriminator(choose)]
