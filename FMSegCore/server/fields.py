"""Reading a request's JSON fields with one-line errors naming the field (HTTP 400)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional


class RequestError(Exception):
    """A request the worker refuses: an HTTP status and one line saying why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_MISSING = object()


class Fields:
    """Typed access to a JSON object's fields."""

    def __init__(self, body: Any, where: str = "request") -> None:
        if not isinstance(body, dict):
            raise RequestError(400, f"{where}: expected a JSON object")
        self.body = body
        self.where = where

    def _get(self, name: str, default: Any) -> Any:
        value = self.body.get(name, default)
        if value is _MISSING:
            raise RequestError(400, f"{self.where}: missing field '{name}'")
        return value

    def text(self, name: str, default: Any = _MISSING, choices: Optional[Sequence[str]] = None) -> Any:
        value = self._get(name, default)
        if value is None and default is None:
            return None
        if not isinstance(value, str):
            raise RequestError(400, f"{self.where}: field '{name}' must be a string")
        if choices is not None and value not in choices:
            raise RequestError(400, f"{self.where}: field '{name}' must be one of {', '.join(choices)}")
        return value

    def number(self, name: str, default: Any = _MISSING, low: float = float("-inf"), high: float = float("inf"),
               integer: bool = False) -> Any:
        value = self._get(name, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and int(value) != value):
            raise RequestError(400, f"{self.where}: field '{name}' must be {'an integer' if integer else 'a number'}")
        if not low <= value <= high:
            raise RequestError(400, f"{self.where}: field '{name}' must be between {low} and {high}")
        return int(value) if integer else float(value)

    def flag(self, name: str, default: Any = _MISSING) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise RequestError(400, f"{self.where}: field '{name}' must be true or false")
        return value

    def items(self, name: str, default: Any = _MISSING, max_items: int = 10_000) -> list:
        value = self._get(name, default)
        if not isinstance(value, list):
            raise RequestError(400, f"{self.where}: field '{name}' must be a list")
        if len(value) > max_items:
            raise RequestError(400, f"{self.where}: field '{name}' has more than {max_items} items")
        return value

    def vector(self, name: str, length: int = 3) -> tuple[float, ...]:
        value = self._get(name, _MISSING)
        if not isinstance(value, list) or len(value) != length or \
                any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise RequestError(400, f"{self.where}: field '{name}' must be a list of {length} numbers")
        return tuple(float(v) for v in value)

    def nested(self, name: str, default: Any = _MISSING) -> Fields:
        return Fields(self._get(name, default), f"{self.where}.{name}")
