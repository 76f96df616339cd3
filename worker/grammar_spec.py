"""A response_format as an llguidance grammar, and whether it compiles (torch-free: the gateway
checks schemas with it before a response starts; the worker compiles them in `worker.grammar`)."""

from __future__ import annotations

from llguidance import LLMatcher, LLParserLimits, LLTokenizer

from worker.protocol import Constraint

# The answer's layout: one space after ':' and ',' and none elsewhere, as models write JSON. With
# free whitespace a small model can emit newlines until max_tokens without breaking the grammar.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A response_format that cannot be enforced; the message says why (a 400)."""


def parser_limits() -> LLParserLimits:
    """Bounds on what a schema can make llguidance do, in its units (~50k/ms of initial lexer fuel,
    ~14k/ms of a step's): a schema that needs more does not compile; a step that needs more fails
    its row alone."""
    return LLParserLimits(initial_lexer_fuel=1_000_000, step_lexer_fuel=100_000, step_max_items=20_000,
                          max_lexer_states=50_000, max_grammar_size=200_000, verbose_errors=False)


def grammar_of(constraint: Constraint, tokenizer: LLTokenizer | None = None) -> str:
    """The checked grammar (with the tokenizer, checked against its vocabulary too); GrammarError if none."""
    schema = constraint.json_schema if constraint.json_schema is not None else {"type": "object"}
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, overrides=JSON_LAYOUT)  # type: ignore[arg-type]
    except ValueError as exc:
        raise GrammarError(f"response_format: the JSON schema cannot be used: {exc}") from None
    problem = LLMatcher.validate_grammar(grammar, tokenizer, limits=parser_limits())
    if problem:
        raise GrammarError(f"response_format: the JSON schema cannot be enforced: {problem[:500]}")
    return grammar
