"""Iteration-level batching engine: a different adapter on every row.

Every step admits waiting requests into the running batch (prefilled together in one
left-padded forward pass, then merged into the batch's left-padded KV cache, within an
explicit KV budget), runs one decode forward for all
running rows, and retires rows that finished, stopped or were aborted, freeing their
KV memory at once. It runs on its own thread; other threads talk to it only through
`submit`, `abort`, `stats` and `stalled_for`.

The thread never dies of a request: whatever a row's input or adapter causes (a sampling
error, non-finite logits, an adapter that will not load) fails that row alone, and an
error nobody foresaw fails the running batch and the loop goes on. Every turn of the loop
is a heartbeat, so a stuck forward pass shows as a stall.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from worker import metrics
from worker.adapter_cache import AdapterCache, AdapterLoadError
from worker.detokenize import IncrementalDecoder
from worker.lora import LoraRouting
from worker.protocol import GenerateRequest
from worker.sampling import RowFailure, choose_tokens, make_generator
from worker.scheduler import FairQueue
from worker.sequence import EventSink, Sequence

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    pass


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int
    max_waiting: int
    kv_cache_tokens: int  # token positions the batch's (left-padded) KV cache may hold in all
    max_prefill_tokens: int = 4096  # padded prompt tokens prefilled in one forward pass (activation memory)


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Keys and values of one token position across all layers."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype.itemsize


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
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        self._inbox: deque[Sequence] = deque()
        self._aborts: deque[str] = deque()
        self._wake = threading.Event()
        self.waiting: FairQueue[Sequence] = FairQueue()
        self.running: list[Sequence] = []
        self.kv: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [batch, cache_len] 1 where the cache holds a real token
        self.last_beat = time.monotonic()  # start of the loop's latest turn
        self.death: str | None = None  # why the loop ended, if it ended other than by `stop`

    # -- called from other threads -------------------------------------------------------
    def submit(self, request: GenerateRequest, prompt_ids: list[int], sink: EventSink) -> None:
        """Queue a request whose prompt was tokenized already (worker.prompts, off this thread)."""
        if len(self._inbox) + len(self.waiting) >= self.limits.max_waiting:
            raise QueueFull(f"the worker's queue is full ({self.limits.max_waiting} waiting requests)")
        self._inbox.append(Sequence(request=request, sink=sink, prompt_ids=prompt_ids))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def stats(self) -> tuple[int, int]:
        """(running, waiting)."""
        return len(self.running), len(self.waiting) + len(self._inbox)

    def stalled_for(self, now: float | None = None) -> float:
        """Seconds since the loop last came round (it comes round every 50 ms when idle)."""
        return (time.monotonic() if now is None else now) - self.last_beat

    # -- the engine thread ---------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        try:
            with torch.inference_mode():
                while not stop.is_set():
                    self.last_beat = time.monotonic()
                    self._wake.clear()
                    self._guarded_step()
                    if not self.running:
                        self._wake.wait(timeout=0.05)
        except BaseException as exc:  # the loop itself broke: health reports it and the worker is replaced
            self.death = f"{type(exc).__name__}: {exc}"
            log.critical("engine loop died: %s", self.death, exc_info=True)
            raise

    def _guarded_step(self) -> None:
        try:
            self.step()
        except Exception as exc:  # a bug, not a request's fault: fail the batch, keep serving
            log.exception("engine step failed; failing the %d running requests", len(self.running))
            for seq in self.running:
                if seq.finish_reason is None:
                    seq.fail(f"internal error in the engine: {type(exc).__name__}")
                self._release_slot(seq)
            self.running, self.kv, self.mask = [], None, None

    def step(self) -> None:
        self._take_inbox()
        self._apply_aborts()
        self._retire_finished()
        self.adapters.collect()
        self._admit()
        self._retire_finished()  # rows done at their first token (max_tokens=1, EOS) never decode
        if self.running:
            self._decode()
        self._retire_finished()

    def _take_inbox(self) -> None:
        while self._inbox:
            seq = self._inbox.popleft()
            try:
                seq.generator = make_generator(seq.request.sampling)
                seq.decoder = IncrementalDecoder(self.tokenizer)
                if seq.request.adapter is not None:
                    self.adapters.prefetch(seq.request.adapter)
            except Exception as exc:  # this request's own parameters: it fails alone
                log.exception("request %s could not be queued", seq.request_id)
                seq.fail(f"the request could not be started: {exc}", status=400)
                continue
            self.waiting.push(seq)

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
        """Move waiting requests that fit into the batch, prefilled together in one forward pass."""
        admitted = self._choose_admissions()
        if not admitted:
            return
        try:
            logits = self._prefill(admitted)
        except Exception as exc:  # a bad prefill fails its own requests, not the running batch
            log.exception("prefill failed for %d requests", len(admitted))
            for seq in admitted:
                seq.fail(f"generation failed: {type(exc).__name__}: {exc}")
                self._release_slot(seq)
            return
        self.running.extend(admitted)
        self._settle(admitted, logits)

    def _choose_admissions(self) -> list[Sequence]:
        """Take waiting requests, in the scheduler's fair order, while the batch has room for them."""
        admitted: list[Sequence] = []
        blocked: list[Sequence] = []
        while len(self.running) + len(admitted) < self.limits.max_batch_size:
            seq = self.waiting.head()
            if seq is None or not self._kv_fits(seq, admitted) or not self._prefill_fits(seq, admitted):
                break  # the one whose turn it is waits for room; nobody jumps it
            self.waiting.remove(seq)
            if not self._take_slot(seq):
                if seq.finish_reason is None:
                    blocked.append(seq)
                continue
            self.waiting.charge(seq.tenant, len(seq.prompt_ids))
            admitted.append(seq)
        for seq in reversed(blocked):
            self.waiting.push_front(seq)
        if admitted:
            self.waiting.forget_idle({s.tenant for s in [*self.running, *admitted]})
        return admitted

    def _take_slot(self, seq: Sequence) -> bool:
        """Give the request its adapter's slot; False while it loads (or the request failed for it)."""
        ref = seq.request.adapter
        if ref is None:
            return True
        try:
            seq.slot = self.adapters.acquire(ref)
        except AdapterLoadError as exc:  # its files or weights are unusable: its requests fail
            seq.fail(str(exc), status=exc.status)
            return False
        if seq.slot is None:  # still loading, or every slot pinned by running rows
            self.adapters.prefetch(ref)  # again, in case its host copy was dropped meanwhile
            return False
        return True

    def _kv_fits(self, seq: Sequence, admitted: list[Sequence]) -> bool:
        """Would the padded cache stay within budget if every row ran to its max_tokens?"""
        rows = [*self.running, *admitted, seq]
        return len(rows) * max(s.reserved_tokens for s in rows) <= self.limits.kv_cache_tokens

    def _prefill_fits(self, seq: Sequence, admitted: list[Sequence]) -> bool:
        if not admitted:
            return True  # one prompt always goes (its length is bounded by the context check)
        rows = [*admitted, seq]
        return len(rows) * max(len(s.prompt_ids) for s in rows) <= self.limits.max_prefill_tokens

    def _prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Run the prompts, merge their cache into the batch's; logits [rows, vocab] of the last position."""
        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, device=self.device)  # [rows, width] left-padded
        mask = torch.zeros(len(seqs), width, dtype=torch.long, device=self.device)  # [rows, width]
        for row, seq in enumerate(seqs):
            n = len(seq.prompt_ids)
            ids[row, width - n :] = torch.tensor(seq.prompt_ids, device=self.device)
            mask[row, width - n :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # real tokens start at position 0
        self._route(seqs)
        kv = DynamicCache(config=self.model.config)
        started = time.monotonic()
        for seq in seqs:
            seq.admitted = started
            metrics.QUEUE_TIME.observe(started - seq.arrived)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=kv,
                         use_cache=True, logits_to_keep=1)
        metrics.STEP_TIME.labels("prefill").observe(time.monotonic() - started)
        metrics.PROMPT_TOKENS.inc(sum(len(s.prompt_ids) for s in seqs))
        self._merge(kv, mask)
        return out.logits[:, -1]

    def _merge(self, kv: DynamicCache, new_mask: torch.Tensor) -> None:
        """Append prefilled rows to the batch cache, left-padding the shorter side."""
        if self.kv is None or self.mask is None:
            self.kv, self.mask = kv, new_mask
            return
        width = max(self.mask.shape[1], new_mask.shape[1])
        # Full-attention layers (keys/values tensors [batch, heads, seq, dim]) for these models.
        layers: list[Any] = self.kv.layers
        new_layers: list[Any] = kv.layers
        for batch_layer, new_layer in zip(layers, new_layers, strict=True):
            batch_layer.keys = torch.cat([_pad_seq(batch_layer.keys, width), _pad_seq(new_layer.keys, width)])
            batch_layer.values = torch.cat(
                [_pad_seq(batch_layer.values, width), _pad_seq(new_layer.values, width)]
            )
        self.mask = torch.cat([_pad_mask(self.mask, width), _pad_mask(new_mask, width)])

    # -- decode --------------------------------------------------------------------------
    def _decode(self) -> None:
        assert self.kv is not None and self.mask is not None
        rows = self.running
        last = torch.tensor([[s.output_ids[-1]] for s in rows], device=self.device)  # [batch, 1]
        positions = torch.tensor([[s.next_position] for s in rows], device=self.device)  # [batch, 1]
        self.mask = torch.cat([self.mask, torch.ones_like(last)], dim=1)
        self._route(rows)
        started = time.monotonic()
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
        metrics.STEP_TIME.labels("decode").observe(time.monotonic() - started)
        metrics.BATCH_SIZE.observe(len(rows))
        self._settle(rows, out.logits[:, -1])

    def _settle(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        """Choose each row's next token from logits [rows, vocab]; a row that cannot go on fails alone."""
        tokens = choose_tokens(logits, [s.request.sampling for s in rows], [s.generator for s in rows])
        for seq, token in zip(rows, tokens, strict=True):
            if seq.finish_reason is not None:
                continue  # aborted while the step ran
            if isinstance(token, RowFailure):
                self._fail_row(seq, token)
                continue
            try:
                self._accept(seq, token)
            except Exception as exc:
                log.exception("request %s failed after its forward pass", seq.request_id)
                seq.fail(f"generation failed: {type(exc).__name__}")

    def _fail_row(self, seq: Sequence, failure: RowFailure) -> None:
        if failure.non_finite and seq.request.adapter is not None:
            # Rows are computed independently, so the values came from this row's adapter.
            seq.fail("the adapter produced non-finite values (NaN or Inf); it cannot serve this prompt", 422)
        else:
            seq.fail(f"generation failed: {failure.message}", failure.status)

    def _route(self, rows: list[Sequence]) -> None:
        zero = self.adapters.zero_slot
        slots = [zero if s.slot is None else s.slot for s in rows]
        self.routing.route(slots, zero, self.adapters.rank_of, self.device)

    def _accept(self, seq: Sequence, token: int) -> None:
        seq.output_ids.append(token)
        self.waiting.charge(seq.tenant, 1)
        metrics.GENERATED_TOKENS.inc()
        params = seq.request.sampling
        if token in self.eos_ids and not params.ignore_eos:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= params.max_tokens:
            seq.finish_reason = "length"
        assert seq.decoder is not None  # set in _take_inbox
        delta = seq.decoder.push(token)
        if seq.finish_reason is not None:
            delta += seq.decoder.finish()
        seq.append_text(delta)
        seq.flush()

    def _release_slot(self, seq: Sequence) -> None:
        if seq.slot is not None and seq.request.adapter is not None:
            self.adapters.release(seq.request.adapter.key)
            seq.slot = None

    def _retire_finished(self) -> None:
        """Drop finished rows from the batch and its cache; trim padding nobody needs."""
        if all(s.finish_reason is None for s in self.running):
            return
        keep = [i for i, s in enumerate(self.running) if s.finish_reason is None]
        for seq in self.running:
            if seq.finish_reason is not None:
                self._release_slot(seq)
        self.running = [self.running[i] for i in keep]
        if not keep or self.kv is None or self.mask is None:
            self.kv, self.mask = None, None
            return
        index = torch.tensor(keep, device=self.device)
        self.kv.batch_select_indices(index)
        self.mask = self.mask[index]
        first_used = int((self.mask.sum(dim=0) > 0).nonzero()[0])
        if first_used > 0:
            layers: list[Any] = self.kv.layers
            for layer in layers:
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
