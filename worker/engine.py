"""Iteration-level batching engine: a different adapter on every row.

Every step admits waiting requests into the running batch (each prefilled on its own,
then merged into the batch's left-padded KV cache), runs one decode forward for all
running rows, and retires rows that finished, stopped or were aborted, freeing their
KV memory at once. It runs on its own thread; other threads talk to it only through
`submit`, `abort` and `stats`.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from worker.adapter_cache import AdapterCache
from worker.lora import LoraRouting
from worker.protocol import GenerateRequest
from worker.sampling import choose_tokens, make_generator
from worker.sequence import EventSink, Sequence

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    pass


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int
    max_waiting: int
    max_context: int


class BatchEngine:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        adapters: AdapterCache,
        routing: LoraRouting,
        limits: EngineLimits,
        device: torch.device,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.routing = routing
        self.limits = limits
        self.device = device
        self.eos_ids = _eos_ids(model, tokenizer)
        self._inbox: deque[Sequence] = deque()
        self._aborts: deque[str] = deque()
        self._wake = threading.Event()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.kv: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [batch, cache_len] 1 where the cache holds a real token

    # -- called from other threads -------------------------------------------------------
    def submit(self, request: GenerateRequest, sink: EventSink) -> None:
        if len(self._inbox) + len(self.waiting) >= self.limits.max_waiting:
            raise QueueFull(f"the worker's queue is full ({self.limits.max_waiting} waiting requests)")
        self._inbox.append(Sequence(request=request, sink=sink))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def stats(self) -> tuple[int, int]:
        """(running, waiting)."""
        return len(self.running), len(self.waiting) + len(self._inbox)

    # -- the engine thread ---------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        with torch.inference_mode():
            while not stop.is_set():
                self._wake.clear()
                self.step()
                if not self.running:
                    self._wake.wait(timeout=0.05)

    def step(self) -> None:
        self._take_inbox()
        self._apply_aborts()
        self._retire_finished()
        self.adapters.collect()
        self._admit()
        if self.running:
            self._decode()
        self._retire_finished()

    def _take_inbox(self) -> None:
        while self._inbox:
            seq = self._inbox.popleft()
            try:
                seq.prompt_ids = self._tokenize(seq.request)
            except ValueError as exc:
                seq.fail(str(exc), status=400)
                continue
            seq.generator = make_generator(seq.request.sampling)
            if seq.request.adapter is not None:
                self.adapters.prefetch(seq.request.adapter)
            self.waiting.append(seq)

    def _tokenize(self, request: GenerateRequest) -> list[int]:
        if request.messages is not None:
            chat = [m.model_dump() for m in request.messages]
            text = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
        else:
            ids = self.tokenizer(request.prompt or "").input_ids
        if not ids:
            raise ValueError("the prompt is empty")
        budget = self.limits.max_context
        if len(ids) + request.sampling.max_tokens > budget:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; with max_tokens={request.sampling.max_tokens} "
                f"that exceeds the model's context of {budget} tokens"
            )
        return list(ids)

    def _apply_aborts(self) -> None:
        if not self._aborts:
            return
        ids = set()
        while self._aborts:
            ids.add(self._aborts.popleft())
        for seq in [s for s in self.waiting if s.request_id in ids]:
            self.waiting.remove(seq)
            seq.finish_reason = "abort"
            seq.flush()
        for seq in self.running:
            if seq.request_id in ids and seq.finish_reason is None:
                seq.finish_reason = "abort"
                seq.flush()

    # -- prefill -------------------------------------------------------------------------
    def _admit(self) -> None:
        blocked: deque[Sequence] = deque()
        while self.waiting and len(self.running) < self.limits.max_batch_size:
            seq = self.waiting.popleft()
            ref = seq.request.adapter
            if ref is not None:
                error = self.adapters.load_error(ref.key)
                if error is not None:
                    seq.fail(error, status=500)
                    continue
                seq.slot = self.adapters.acquire(ref)
                if seq.slot is None:  # still loading, or every slot pinned by running rows
                    blocked.append(seq)
                    continue
            try:
                self._prefill(seq)
            except Exception as exc:  # one bad request must not take the batch down
                log.exception("prefill failed for %s", seq.request_id)
                seq.fail(f"generation failed: {exc}")
                if ref is not None:
                    self.adapters.release(ref.key)
        self.waiting.extendleft(reversed(blocked))

    def _prefill(self, seq: Sequence) -> None:
        ids = torch.tensor([seq.prompt_ids], device=self.device)  # [1, prompt_len]
        self._route([seq])
        kv = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, past_key_values=kv, use_cache=True)
        (token,) = choose_tokens(out.logits[:, -1], [seq.request.sampling], [seq.generator])
        self._merge(kv, len(seq.prompt_ids))
        self.running.append(seq)
        self._accept(seq, token)

    def _merge(self, kv: DynamicCache, length: int) -> None:
        """Append one prefilled row to the batch cache, left-padding the shorter side."""
        row_mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        if self.kv is None or self.mask is None:
            self.kv, self.mask = kv, row_mask
            return
        width = max(self.mask.shape[1], length)
        for batch_layer, row_layer in zip(self.kv.layers, kv.layers, strict=True):
            batch_layer.keys = torch.cat([_pad_seq(batch_layer.keys, width), _pad_seq(row_layer.keys, width)])
            batch_layer.values = torch.cat(
                [_pad_seq(batch_layer.values, width), _pad_seq(row_layer.values, width)]
            )
        self.mask = torch.cat([_pad_mask(self.mask, width), _pad_mask(row_mask, width)])

    # -- decode --------------------------------------------------------------------------
    def _decode(self) -> None:
        assert self.kv is not None and self.mask is not None
        rows = self.running
        last = torch.tensor([[s.output_ids[-1]] for s in rows], device=self.device)  # [batch, 1]
        positions = torch.tensor([[s.next_position] for s in rows], device=self.device)  # [batch, 1]
        self.mask = torch.cat([self.mask, torch.ones_like(last)], dim=1)
        self._route(rows)
        try:
            out = self.model(
                input_ids=last,
                attention_mask=self.mask,
                position_ids=positions,
                past_key_values=self.kv,
                use_cache=True,
            )
        except Exception as exc:
            log.exception("decode step failed; failing the running batch")
            for seq in rows:
                if seq.finish_reason is None:
                    seq.fail(f"generation failed: {exc}")
            return
        tokens = choose_tokens(
            out.logits[:, -1], [s.request.sampling for s in rows], [s.generator for s in rows]
        )
        for seq, token in zip(rows, tokens, strict=True):
            if seq.finish_reason is None:
                self._accept(seq, token)

    def _route(self, rows: list[Sequence]) -> None:
        zero = self.adapters.zero_slot
        slots = [zero if s.slot is None else s.slot for s in rows]
        active = frozenset(slot for slot in slots if slot != zero)
        if not active:
            self.routing.clear()
            return
        self.routing.slots = torch.tensor(slots, device=self.device)
        self.routing.active = active
        self.routing.rank = max(self.adapters.rank_of(slot) for slot in active)

    def _accept(self, seq: Sequence, token: int) -> None:
        seq.output_ids.append(token)
        params = seq.request.sampling
        if token in self.eos_ids:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= params.max_tokens:
            seq.finish_reason = "length"
        seq.update_text(self.tokenizer.decode(seq.output_ids, skip_special_tokens=True))
        seq.flush()

    def _retire_finished(self) -> None:
        """Drop finished rows from the batch and its cache; trim padding nobody needs."""
        if all(s.finish_reason is None for s in self.running):
            return
        keep = [i for i, s in enumerate(self.running) if s.finish_reason is None]
        for seq in self.running:
            if seq.finish_reason is not None and seq.slot is not None and seq.request.adapter is not None:
                self.adapters.release(seq.request.adapter.key)
                seq.slot = None
        self.running = [self.running[i] for i in keep]
        if not keep or self.kv is None or self.mask is None:
            self.kv, self.mask = None, None
            return
        index = torch.tensor(keep, device=self.device)
        self.kv.batch_select_indices(index)
        self.mask = self.mask[index]
        first_used = int((self.mask.sum(dim=0) > 0).nonzero()[0])
        if first_used > 0:
            for layer in self.kv.layers:
                layer.keys = layer.keys[:, :, first_used:]
                layer.values = layer.values[:, :, first_used:]
            self.mask = self.mask[:, first_used:]


def _pad_seq(t: torch.Tensor, width: int) -> torch.Tensor:
    """[batch, heads, seq, dim] left-padded with zeros to `width` positions."""
    return F.pad(t, (0, 0, width - t.shape[-2], 0))


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(mask, (width - mask.shape[-1], 0))


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
