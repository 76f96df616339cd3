"""PEFT's module patterns, resolved once at upload with a linear-time matcher.

`adapter_config.json` may name modules by regular expression: `target_modules` as one
string, and the keys of `alpha_pattern` / `rank_pattern`. PEFT evaluates those with
Python's backtracking `re`, where a pattern such as `(.|.|.)*Z` runs for hours while
holding the GIL. Here they are compiled with RE2 (linear time, bounded memory; no
backreferences or lookaround, which are refused with a message) and evaluated against the
adapter's own module names at upload. The stored config keeps only the results, keyed by
full module name, so a worker never evaluates a tenant's pattern.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import re2

MAX_PATTERN_CHARS = 512  # one pattern or module name in adapter_config.json
MAX_PATTERNS = 4096  # keys of alpha_pattern plus rank_pattern
_RE2_MEMORY = 8 * 2**20  # bytes one compiled pattern may use


class PatternError(ValueError):
    """A pattern in adapter_config.json cannot be used; the message names it."""


def _compile(field: str, pattern: object) -> Any:
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"adapter_config.json {field}: each pattern must be a string of 1-{MAX_PATTERN_CHARS} "
                           f"characters, got {str(pattern)[:80]!r}")
    options = re2.Options()
    options.max_mem = _RE2_MEMORY
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        detail = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        raise PatternError(
            f"adapter_config.json {field}: pattern {pattern[:80]!r} is not supported ({detail}); "
            "patterns are matched with RE2: no backreferences or lookaround"
        ) from None


def resolve_module_pattern(field: str, patterns: dict[str, Any], modules: Iterable[str]) -> dict[str, Any]:
    """{full module name: value} as PEFT resolves `alpha_pattern` / `rank_pattern` for these modules.

    PEFT takes, for each module, the first key (in the file's order) for which
    `(.*\\.)?(key)$` matches the module name.
    """
    compiled = [(_compile(field, f"(?:.*\\.)?(?:{key})"), value, key) for key, value in patterns.items()]
    resolved: dict[str, Any] = {}
    for module in modules:
        for regex, value, _ in compiled:
            if regex.fullmatch(module):
                resolved[module] = value
                break
    return resolved


def targeted(target_modules: object, module: str) -> bool:
    """Whether PEFT's `target_modules` covers this module (a name list, one regex, or 'all-linear')."""
    if target_modules is None or target_modules == "all-linear":
        return True  # all-linear: every linear layer; absent: PEFT's per-architecture default
    if isinstance(target_modules, str):
        return _compile("target_modules", target_modules).fullmatch(module) is not None
    if isinstance(target_modules, list):
        return any(isinstance(t, str) and (module == t or module.endswith("." + t)) for t in target_modules)
    raise PatternError("adapter_config.json target_modules must be a list of module names or one pattern")
