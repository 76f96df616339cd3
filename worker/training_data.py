"""Fine-tuning files: OpenAI's chat JSONL, read strictly, and turned into tokens the way serving does.

The gateway checks every line when a file is uploaded (`read_examples`: no tokenizer, no torch);
the training process reads the file again the same way and tokenizes it (`encode`): the chat
template applied exactly as the worker applies it to a chat request, and the loss on the tokens of
the assistant's turns only (each turn's text and the template's end-of-turn marker).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

MAX_LINE_BYTES = 1 << 20
MAX_MESSAGES = 256
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
IGNORED_MESSAGE_KEYS = {"name"}  # accepted, as the chat API accepts them, and not part of the prompt


class TrainingDataError(ValueError):
    """A line (or the file) cannot be trained on; the message names the line and the problem."""


@dataclass(frozen=True)
class Turn:
    role: str  # system | user | assistant (developer is system, as in chat requests)
    content: str
    weight: int = 1  # assistant turns only: 0 leaves the turn out of the loss


Example = list[Turn]


def _reject_constant(literal: str) -> float:
    raise ValueError(f"{literal} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is not a finite number")
    return value


def parse_line(raw: bytes, line: int) -> Example:
    """One JSONL line as a conversation, or TrainingDataError naming the line."""
    where = f"line {line}"
    if len(raw) > MAX_LINE_BYTES:
        raise TrainingDataError(f"{where}: {len(raw)} bytes, over the {MAX_LINE_BYTES}-byte limit per line")
    try:
        value = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite)
    except RecursionError:
        raise TrainingDataError(f"{where}: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, a huge integer, NaN
        raise TrainingDataError(f"{where}: not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(value, dict):
        raise TrainingDataError(f"{where}: each line must be a JSON object with \"messages\"")
    extra = sorted(set(value) - {"messages"})
    if extra:
        what = "tools are not supported (the model is trained on chat messages only)" if (
            {"tools", "functions"} & set(extra)) else "unknown key"
        raise TrainingDataError(f"{where}: {what}: {', '.join(repr(k[:40]) for k in extra[:5])}")
    messages = value.get("messages")
    if not isinstance(messages, list) or not messages:
        raise TrainingDataError(f"{where}: \"messages\" must be a non-empty list")
    if len(messages) > MAX_MESSAGES:
        raise TrainingDataError(f"{where}: {len(messages)} messages, over the limit of {MAX_MESSAGES}")
    turns = [_turn(m, f"{where}: messages[{i}]") for i, m in enumerate(messages)]
    if turns[0].role == "assistant":
        raise TrainingDataError(f"{where}: the conversation starts with an assistant message; "
                                "put the user (or system) message it answers before it")
    if not any(t.role == "assistant" and t.weight for t in turns):
        raise TrainingDataError(f"{where}: no assistant message to learn from (at least one with weight 1)")
    return turns


def _turn(message: Any, where: str) -> Turn:
    if not isinstance(message, dict):
        raise TrainingDataError(f"{where} must be an object with \"role\" and \"content\"")
    role = message.get("role")
    if role not in ROLES:
        shown = repr(role)[:40] if isinstance(role, str) else type(role).__name__
        hint = " (tool calls are not supported)" if role in ("tool", "function") else ""
        raise TrainingDataError(f"{where}.role must be one of system, developer, user, assistant; got {shown}{hint}")
    unknown = sorted(set(message) - {"role", "content", "weight"} - IGNORED_MESSAGE_KEYS)
    if unknown:
        raise TrainingDataError(f"{where}: unsupported key(s) {', '.join(repr(k[:40]) for k in unknown[:5])}"
                                + (" (tool calls are not supported)" if {"tool_calls", "function_call"} & set(unknown)
                                   else ""))
    content = _content(message.get("content"), f"{where}.content")
    weight = message.get("weight", 1)
    if "weight" in message and (role != "assistant" or weight not in (0, 1) or isinstance(weight, bool)):
        raise TrainingDataError(f"{where}.weight must be 0 or 1, and only on assistant messages")
    if role == "assistant" and not content.strip():
        raise TrainingDataError(f"{where}: an assistant message with no content")
    return Turn(ROLES[role], content, int(weight))


def _content(content: Any, where: str) -> str:
    if isinstance(content, list):  # text parts, as chat requests accept them
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise TrainingDataError(f"{where}[{i}] must be a text part {{\"type\": \"text\", \"text\": ...}}; "
                                        "the model is text-only")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise TrainingDataError(f"{where} must be a string (or a list of text parts)")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:
        raise TrainingDataError(f"{where} holds a lone surrogate (\\ud800-\\udfff escape), not text") from None
    return content


def read_examples(lines: Iterable[bytes], max_examples: int) -> Iterator[Example]:
    """Every non-blank line as a conversation; the first bad one raises, naming it."""
    count = 0
    for number, raw in enumerate(lines, start=1):
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark some editors write
        if not raw.strip():
            continue
        count += 1
        if count > max_examples:
            raise TrainingDataError(f"line {number}: over the limit of {max_examples} examples per file "
                                    "(max_training_examples)")
        yield parse_line(raw, number)


# -- tokens (the training process) -----------------------------------------------------------
def _chat(turns: list[Turn]) -> list[dict[str, str]]:
    return [{"role": t.role, "content": t.content} for t in turns]


def encode(tokenizer: Any, turns: Example) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation as serving renders it, and labels: each assistant turn's
    tokens (weight 1) as themselves, every other token -100 (no loss)."""
    chat = _chat(turns)
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    spans = []
    for i, turn in enumerate(turns):
        if turn.role != "assistant" or not turn.weight:
            continue
        # What serving would send as the prompt for this turn, and the conversation up to its end.
        prompt = tokenizer.apply_chat_template(chat[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(chat[:i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(prompt)):
            raise TrainingDataError("the base model's chat template does not render this conversation turn by turn")
        spans.append((len(prompt), len(upto)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [
        token if any(start <= a and b <= end for start, end in spans) and b > a else -100
        for token, (a, b) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return ids, labels
