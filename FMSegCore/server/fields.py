"""The rules a request's JSON fields follow (pydantic types, strict: no string is read as a number), and their
violations as one line naming the field (HTTP 400).

The request models (:mod:`~FMSegCore.server.schemas`) are built from these types and from the option sets of
:mod:`FMSegCore.options` (:func:`options_model`); FastAPI validates request bodies with them and the service
validates an upload's meta with :func:`parse`, so each rule is written once. ``fmseg`` validates its options with
the same models and words (:func:`rule`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Annotated, Any, ClassVar, Literal, Optional, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    create_model,
)
from pydantic_core import PydanticCustomError

from FMSegCore.options import DeviceName, OptionInfo, options_of


class RequestError(Exception):
    """A request the worker refuses: an HTTP status and one line saying why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class RequestModel(BaseModel):
    """A JSON object of a request: strict types, unknown fields ignored; ``where`` names it in errors."""

    model_config = ConfigDict(strict=True, extra="ignore")
    where: ClassVar[str] = "request"


def _numbers(length: int, positive: bool = False) -> Any:
    """A validator of a list of ``length`` numbers (not booleans), read as a tuple of floats."""

    def check(value: Any) -> tuple[float, ...]:
        if not isinstance(value, (list, tuple)) or len(value) != length or \
                any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise PydanticCustomError("fmseg", f"must be a list of {length} numbers")
        if positive and min(value) <= 0:
            raise PydanticCustomError("fmseg", "must hold positive numbers")
        return tuple(float(v) for v in value)

    return check


def vector(length: int = 3, positive: bool = False) -> Any:
    """The type of a field holding ``length`` numbers (a point, a spacing, a row-major matrix)."""
    schema = {"type": "array", "items": {"type": "number", **({"exclusiveMinimum": 0} if positive else {})},
              "minItems": length, "maxItems": length}
    return Annotated[tuple[float, ...], PlainValidator(_numbers(length, positive)), WithJsonSchema(schema)]


Vector3 = vector(3)


def device_type(rule: DeviceName) -> Any:
    """The type of a device field following ``rule`` (:class:`FMSegCore.options.DeviceName`)."""

    def check(name: str) -> str:
        problem = rule.problem(name)
        if problem:
            raise PydanticCustomError("fmseg", problem)
        return name

    description = "auto, cpu, cuda, cuda:N or mps" + (f"; empty: {rule.empty}" if rule.empty else "")
    return Annotated[str, AfterValidator(check), Field(description=description)]


def option_type(info: OptionInfo) -> Any:
    """The pydantic type of one option: its choices, range and device rule (None allowed when optional)."""
    base: Any = Literal[info.choices] if info.choices else info.kind  # type: ignore[valid-type]
    if info.device is not None:
        base = device_type(info.device)
    if info.range is not None:
        base = Annotated[base, Field(ge=info.range.low, le=info.range.high)]
    return Optional[base] if info.optional else base


@cache
def options_model(options: type) -> type[RequestModel]:
    """A request model holding the options of an option set (:mod:`FMSegCore.options`): the same names, defaults,
    choices and ranges, under this module's strict rules. Request bodies inherit it and add their own fields."""
    fields: dict[str, Any] = {name: (option_type(info), info.default) for name, info in options_of(options).items()}
    return create_model(f"{options.__name__}Options", __base__=RequestModel, **fields)

Model = TypeVar("Model", bound=RequestModel)


def parse(model: type[Model], data: Any) -> Model:
    """``data`` validated as ``model``; a violation raises :class:`RequestError` (400) in one line."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise RequestError(400, one_line(error.errors(), model.where)) from None


_OBJECT = "must be a JSON object"
_PHRASES = {
    "missing": "is missing",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "dict_type": _OBJECT,
    "model_type": _OBJECT,
    "model_attributes_type": _OBJECT,
    "literal_error": "must be one of {expected}",
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "greater_than": "must be more than {gt}",
    "less_than": "must be less than {lt}",
    "too_short": "must hold at least {min_length} item(s)",
    "too_long": "must hold at most {max_length} item(s)",
}


def one_line(errors: Sequence[dict[str, Any]], where: str = "request") -> str:
    """The first of pydantic's (or FastAPI's) validation errors as one line: ``where.path: field 'x' ...``."""
    if not errors:
        return f"{where}: invalid request"
    error = errors[0]
    kind, ctx = error.get("type", ""), error.get("ctx") or {}
    loc = list(error.get("loc", ()))
    if loc and loc[0] == "body":  # FastAPI's prefix for the request body
        loc = loc[1:]
    more = "" if len(errors) < 2 else f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    if kind == "json_invalid":
        return f"{where}: request body is not valid JSON ({ctx.get('error', 'decode error')})"
    name = loc.pop() if loc and isinstance(loc[-1], str) else None
    path = where + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    if kind == "missing" and name is None:
        return f"{path}: expected a JSON object"
    if kind == "missing":
        return f"{path}: missing field '{name}'{more}"
    subject = f"field '{name}' " if name is not None else ""
    return " ".join(f"{path}: {subject}{rule(error)}{more}".split())


def rule(error: dict[str, Any]) -> str:
    """What one of pydantic's validation errors says the value must be (``must be at most 64``), without naming
    the field: the worker's answers and ``fmseg``'s errors share these words."""
    kind, ctx = error.get("type", ""), error.get("ctx") or {}
    phrase = str(error.get("msg", "is invalid")).removeprefix("Value error, ")
    if kind in _PHRASES:
        try:
            phrase = _PHRASES[kind].format(**ctx)
        except (KeyError, IndexError):  # a context this pydantic does not give: its own words
            pass
    return " ".join(phrase.split())
