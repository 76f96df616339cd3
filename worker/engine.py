"""Iteration-level batching engine: a different adapter on every row.

Every step admits waiting requests that fit (a batch row and a KV region each, in the fair
scheduler's order), then runs one forward pass over a flat run of tokens: one for each row
that is decoding and chunks of the prompts still being prefilled, within `max_prefill_tokens`
prompt tokens per step, so a long prompt no longer stalls the running rows for its whole
prefill (with no row decoding, prompts go in larger chunks). Rows that finished, stopped or
were aborted are retired and their KV region freed at once.

The engine only sequences the work: which request goes next, which KV region it gets and what
each pass feeds are `worker.scheduler`'s (no torch there); the pass itself is
`worker.runner`'s, KV memory and attention `worker.kvcache`'s; tokens, text and finishing are
`worker.output`'s. The engine runs on its own thread; other threads talk to it only through
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

from worker import metrics
from worker.adapter_cache import AdapterCache, AdapterLoadError
from worker.detokenize import IncrementalDecoder
from worker.grammar import Grammars
from worker.lora_routing import LoraRouting
from worker.output import OutputProcessor, eos_ids
from worker.protocol import GenerateRequest
from worker.runner import ModelRunner
from worker.sampling import make_generator
from worker.scheduler import FairQueue, RegionAllocator, plan_pass
from worker.sequence import EventSink, Sequence

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    pass


class EngineClosed(RuntimeError):
    """The engine has stopped for good (its worker moved to another base model): nothing it takes runs."""


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int
    max_waiting: int
    kv_cache_tokens: int  # token positions of the KV pool, shared by all running rows
    max_prefill_tokens: int = 64  # prompt tokens prefilled per step while other rows decode
    max_prefill_tokens_idle: int = 2048  # per step when no row is decoding (nobody waits on the step)


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
        kv_dtype: torch.dtype | None = None,  # the KV pool's (default: the model's dtype)
    ) -> None:
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.limits = limits
        self._inbox: deque[Sequence] = deque()
        self._submit_lock = threading.Lock()  # `submit` against `fail_everything` closing the engine
        self.closed: str | None = None  # why it takes no more requests, once `fail_everything` ran
        self._aborts: deque[str] = deque()
        self._wake = threading.Event()
        self.waiting: FairQueue[Sequence] = FairQueue()
        self.running: list[Sequence] = []  # admitted rows, prefilling or decoding, in admission order
        self.runner = ModelRunner(model, adapters, routing, limits.kv_cache_tokens, device, kv_dtype)
        self.output = OutputProcessor(eos_ids(model, tokenizer), self.waiting.charge, Grammars(tokenizer))
        self.regions = RegionAllocator(limits.kv_cache_tokens)
        self.last_beat = time.monotonic()  # start of the loop's latest turn
        self.death: str | None = None  # why the loop ended, if it ended other than by `stop`

    # -- called from other threads -------------------------------------------------------
    def submit(self, request: GenerateRequest, prompt_ids: list[int], sink: EventSink, matcher: Any = None) -> None:
        """Queue a request whose prompt was tokenized, and response_format compiled into `matcher`,
        already (worker.prompts, off this thread)."""
        with self._submit_lock:
            if self.closed is not None:  # a prompt still being tokenized when a move's drain ran out
                raise EngineClosed(self.closed)
            if len(self._inbox) + len(self.waiting) >= self.limits.max_waiting:
                raise QueueFull(f"the worker's queue is full ({self.limits.max_waiting} waiting requests)")
            self._inbox.append(Sequence(request=request, sink=sink, prompt_ids=prompt_ids, matcher=matcher))
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

    def fail_everything(self, message: str, status: int = 503) -> None:
        """Fail every request it holds, and refuse any submitted later (`EngineClosed`: nothing would
        run it); only once its thread has ended (a worker changing base model)."""
        with self._submit_lock:
            self.closed = message
            held = [*self._inbox, *self.waiting, *self.running]
            self._inbox.clear()
        for seq in held:
            if seq.finish_reason is None:
                seq.fail(message, status)
        self.running = []

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
                if seq.slot is not None and seq.request.adapter is not None:
                    self.adapters.release(seq.request.adapter.key)
                seq.slot, seq.region = None, None
            self.running = []
            self.regions = RegionAllocator(self.limits.kv_cache_tokens)  # no row runs: all of the pool is free

    def step(self) -> None:
        self._take_inbox()
        self._apply_aborts()
        self._retire_finished()
        self.adapters.collect()
        self._admit()
        if self.running:
            self._forward(plan_pass(self.running, self.limits.max_prefill_tokens, self.limits.max_prefill_tokens_idle))
        self._retire_finished()

    def _take_inbox(self) -> None:
        while self._inbox:
            seq = self._inbox.popleft()
            try:
                seq.generator = make_generator(seq.request.sampling)
                seq.decoder = IncrementalDecoder(self.tokenizer)
                seq.siblings = [self._sibling(seq, i) for i in range(1, seq.request.sampling.n)]
                if seq.request.adapter is not None:
                    self.adapters.prefetch(seq.request.adapter)
            except Exception as exc:  # this request's own parameters: it fails alone
                log.exception("request %s could not be queued", seq.request_id)
                seq.fail(f"the request could not be started: {exc}", status=400)
                continue
            self.waiting.push(seq)  # its siblings ride with it: they are admitted together

    def _sibling(self, first: Sequence, index: int) -> Sequence:
        """Choice `index` of an n > 1 request: its own random stream, decoder and grammar state."""
        sibling = Sequence(request=first.request, sink=first.sink, prompt_ids=first.prompt_ids,
                           matcher=None if first.matcher is None else first.matcher.deep_copy(),
                           index=index, first=first, arrived=first.arrived)
        sibling.generator = make_generator(first.request.sampling, index)
        sibling.decoder = IncrementalDecoder(self.tokenizer)
        return sibling

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

    # -- admission -----------------------------------------------------------------------
    def _admit(self) -> None:
        """Move waiting requests that fit into the batch; their prompts are prefilled from the next pass on."""
        admitted: list[Sequence] = []
        blocked: list[Sequence] = []
        while len(self.running) + len(admitted) < self.limits.max_batch_size:
            seq = self.waiting.head()
            if seq is None:
                break
            group = [seq, *seq.siblings]  # n > 1: every choice at once, or none
            if len(self.running) + len(admitted) + len(group) > self.limits.max_batch_size:
                break  # it waits for rows; nobody jumps it
            regions = self._regions_for(group)
            if regions is None:
                break  # the one whose turn it is waits for KV memory; nobody jumps it
            self.waiting.remove(seq)
            if not self._take_slot(seq):
                for row, region in zip(group, regions, strict=True):
                    self.regions.free(region, row.reserved_tokens)
                if seq.finish_reason is None:
                    blocked.append(seq)
                continue
            self._seat(group, regions)
            admitted.extend(group)
        for seq in reversed(blocked):
            self.waiting.push_front(seq)
        if admitted:
            self.running.extend(admitted)
            self.waiting.forget_idle({s.tenant for s in self.running})

    def _seat(self, group: list[Sequence], regions: list[int]) -> None:
        """The group's rows take their regions; choice 0's adapter slot is pinned once per choice."""
        first, now = group[0], time.monotonic()
        for row, region in zip(group, regions, strict=True):
            row.region, row.admitted = region, now
            if row is not first and first.slot is not None and first.request.adapter is not None:
                row.slot = first.slot
                self.adapters.pin(first.request.adapter.key)
        metrics.QUEUE_TIME.observe(now - first.arrived)
        self.waiting.charge(first.tenant, len(first.prompt_ids))

    def _regions_for(self, group: list[Sequence]) -> list[int] | None:
        """A KV region for every row of the group, or none at all."""
        regions: list[int] = []
        for row in group:
            region = self.regions.allocate(row.reserved_tokens)
            if region is None:
                for taken, region_of in zip(group, regions, strict=False):
                    self.regions.free(region_of, taken.reserved_tokens)
                return None
            regions.append(region)
        return regions

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

    # -- the forward pass ----------------------------------------------------------------
    def _forward(self, plan: list[tuple[Sequence, int]]) -> None:
        """One forward pass over the planned tokens; rows whose next token is due get it."""
        if not plan:
            return
        started = time.monotonic()
        try:
            result = self.runner.run(plan)
        except Exception as exc:
            log.exception("forward pass failed; failing its %d rows", len(plan))
            for seq, _ in plan:
                if seq.finish_reason is None:
                    seq.fail(f"generation failed: {type(exc).__name__}: {exc}")
            return
        phase = "prefill" if result.prompt_tokens else "decode"
        metrics.STEP_TIME.labels(phase).observe(time.monotonic() - started)
        metrics.BATCH_SIZE.observe(len(plan))
        metrics.PROMPT_TOKENS.inc(result.prompt_tokens)
        if result.scores:
            self.output.score_prompts(result.scores)
        if result.due:
            self.output.settle(result.due, result.logits)

    def _release(self, seq: Sequence) -> None:
        """Give back the row's adapter slot and KV region."""
        if seq.slot is not None and seq.request.adapter is not None:
            self.adapters.release(seq.request.adapter.key)
            seq.slot = None
        region, seq.region = seq.region, None
        if region is not None:
            self.regions.free(region, seq.reserved_tokens)

    def _retire_finished(self) -> None:
        """Drop finished rows from the batch; their KV regions are free for the next admission."""
        for seq in self.running:
            first = seq.first
            if seq.follows and first is not None and first.finish_reason is not None and seq.finish_reason is None:
                seq.finish_reason = "abort"  # choice 0 ended before its prompt was shared (a failure, an abort)
        if all(s.finish_reason is None for s in self.running):
            return
        for seq in self.running:
            if seq.finish_reason is not None:
                self._release(seq)
        self.running = [s for s in self.running if s.finish_reason is None]

