"""Request bodies parsed as strict JSON: every malformation is a 422 that says what is wrong.

Python's parser accepts NaN and Infinity, and fails integers of thousands of digits or deep
nesting with errors FastAPI turns into a bare 400 "There was an error parsing the body".
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


class _NonFinite:
    """Where the body held NaN, Infinity or a float literal beyond float64: named by path afterwards."""

    def __init__(self, literal: str) -> None:
        self.literal = literal


def strict_json(body: bytes) -> Any:
    """Parse, or raise `json.JSONDecodeError` with a message naming the problem (and the field)."""

    def finite_float(text: str) -> float | _NonFinite:
        value = float(text)
        return value if math.isfinite(value) else _NonFinite(text[:40])

    try:
        parsed = json.loads(body, parse_constant=_NonFinite, parse_float=finite_float)
    except RecursionError:
        raise json.JSONDecodeError("the body is nested too deeply", "", 0) from None
    except json.JSONDecodeError:
        raise
    except ValueError as exc:  # an integer of thousands of digits, invalid UTF-8
        raise json.JSONDecodeError(str(exc)[:200], "", 0) from None
    _refuse_non_finite(parsed, "")
    return parsed


def _refuse_non_finite(value: Any, path: str) -> None:
    if isinstance(value, _NonFinite):
        raise json.JSONDecodeError(f"{path or 'the body'}: {value.literal} is not a finite number; JSON numbers "
                                   "must be finite", "", 0)
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        _refuse_non_finite(child, f"{path}.{key}" if path else str(key))


class _StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_json(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    """The route class of every router: its JSON body goes through `strict_json`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_StrictJsonRequest(request.scope, request.receive))

        return strict
