"""The engine under the loads real users bring (part of `make bench`, see bench.engine_bench).

(b) throughput as the number of distinct adapters grows past the device slots (1, 4, 16, 64),
    also written to bench/results/adapters.json and, with matplotlib installed, adapters.png;
(c) decode speed at ~1,000 tokens of context against the same batch at ~64;
(e) inter-token latency of running streams while a ~2,000-token prompt is admitted;
(h) what one row under a JSON schema (response_format) costs the 15 free rows of its batch;
(i) n=4 choices of one long prompt in one request (one prefill, the KV copied) against four requests.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

from bench.common import PROMPTS, Row
from worker.protocol import AdapterRef, Constraint, GenerateEvent, GenerateRequest, SamplingParams
from worker.runtime import LoadedWorker

RESULTS = Path(__file__).parent / "results"
DISTINCT_COUNTS = (1, 4, 16, 64)
CURVE_REQUESTS = 64
LONG_CONTEXT = 1000
SHORT_CONTEXT = 64
LONG_BATCH = 8
STREAMS = 8
ADMITTED_PROMPT = 2000


class Streams:
    """Requests submitted together; when each event of each arrived."""

    def __init__(self, worker: LoadedWorker) -> None:
        self.worker = worker
        self.times: dict[str, list[float]] = {}
        self.tokens: dict[str, list[int]] = {}  # completion tokens so far, at each event
        self.done: dict[str, threading.Event] = {}
        self.choices: dict[str, int] = {}  # n of each request: done once all its choices finished
        self.finished: dict[str, int] = {}
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def submit(self, prompt: str, max_tokens: int, adapter: AdapterRef | None = None,
               constraint: Constraint | None = None, n: int = 1, temperature: float = 0.0) -> str:
        sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True, constraint=constraint, n=n,
                                  temperature=temperature, seed=0)
        request = GenerateRequest(request_id=uuid.uuid4().hex, prompt=prompt, adapter=adapter, sampling=sampling)
        self.times[request.request_id] = []
        self.tokens[request.request_id] = []
        self.done[request.request_id] = threading.Event()
        self.choices[request.request_id] = n
        prepared = self.worker.prompts.prepare(request)
        self.worker.engine.submit(request, prepared.ids, self._sink, prepared.matcher)
        return request.request_id

    def _sink(self, event: GenerateEvent) -> None:
        usage = event.usage or event.progress
        with self._lock:
            self.times[event.request_id].append(time.perf_counter())
            self.tokens[event.request_id].append(usage.completion_tokens if usage else 0)
        if event.finished:
            if event.error:
                self.errors.append(event.error)
            self.finished[event.request_id] = self.finished.get(event.request_id, 0) + 1
            if event.error or self.finished[event.request_id] == self.choices[event.request_id]:
                self.done[event.request_id].set()

    def wait(self, request_ids: list[str] | None = None) -> None:
        for request_id in request_ids or list(self.done):
            if not self.done[request_id].wait(1800):
                raise RuntimeError("a benchmark request did not finish")
        if self.errors:
            raise RuntimeError(self.errors[0])


def prompt_of(worker: LoadedWorker, tokens: int, seed: int) -> str:
    """A prompt of about `tokens` tokens: the benchmark prompts, rotated by `seed`, repeated and cut."""
    text = " ".join(PROMPTS[seed % len(PROMPTS):] + PROMPTS[: seed % len(PROMPTS)])
    tokenizer = worker.engine.tokenizer
    ids: list[int] = []
    while len(ids) < tokens:
        ids += tokenizer.encode(" " + text, add_special_tokens=False)
    return str(tokenizer.decode(ids[:tokens]))


def interleaved(rounds: int, lines: dict[str, Callable[[], float]]) -> dict[str, float]:
    """The median of `rounds` rounds of every line, the lines interleaved in each round."""
    values: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, line in lines.items():
            values.setdefault(name, []).append(line())
    return {name: statistics.median(v) for name, v in values.items()}


# -- (b) distinct adapters past the slots ---------------------------------------------------------
def adapters_curve(worker: LoadedWorker, refs: list[AdapterRef], n: int, rounds: int) -> list[Row]:
    """64 requests, request i on adapter i mod k, k = 1, 4, 16, 64, through 16 batch rows and the slots."""

    def line(k: int) -> Callable[[], float]:
        def run() -> float:
            streams = Streams(worker)
            started = time.perf_counter()
            for i in range(CURVE_REQUESTS):
                streams.submit(PROMPTS[i % len(PROMPTS)], n, refs[i % k])
            streams.wait()
            return CURVE_REQUESTS * n / (time.perf_counter() - started)
        return run

    warm = Streams(worker)  # every adapter parsed into the host tier once: the curve measures slot swaps
    for ref in refs[: max(DISTINCT_COUNTS)]:
        warm.submit(PROMPTS[0], 1, ref)
    warm.wait()
    speeds = interleaved(rounds, {str(k): line(k) for k in DISTINCT_COUNTS})
    one = speeds["1"]
    slots = worker.adapters.num_slots
    RESULTS.mkdir(exist_ok=True)
    curve = [{"distinct_adapters": k, "tokens_per_s": speeds[str(k)], "ratio_to_one": speeds[str(k)] / one}
             for k in DISTINCT_COUNTS]
    (RESULTS / "adapters.json").write_text(json.dumps(
        {"requests": CURVE_REQUESTS, "new_tokens": n, "device_slots": slots, "curve": curve}, indent=2) + "\n")
    _plot(curve, slots)
    return [Row("b", f"{CURVE_REQUESTS} requests over {k} distinct adapters ({slots} device slots)", 16,
                speeds[str(k)], "tok/s", f"{speeds[str(k)] / one:.2f}", "≥ 0.50" if k == 64 else "")
            for k in DISTINCT_COUNTS]


def _plot(curve: list[dict[str, float]], slots: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): bench/results/adapters.png not written")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["distinct_adapters"] for p in curve], [p["tokens_per_s"] for p in curve], marker="o")
    ax.axvline(slots, linestyle="--", color="grey", label=f"{slots} device slots")
    ax.set_xscale("log", base=2)
    ax.set_xticks([p["distinct_adapters"] for p in curve], [str(p["distinct_adapters"]) for p in curve])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("distinct adapters among 64 requests")
    ax.set_ylabel("tokens/s")
    ax.set_title("loraplex engine: throughput as adapters outnumber slots")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "adapters.png", dpi=100)
    plt.close(fig)


# -- (c) long context ------------------------------------------------------------------------------
def decode_speed(worker: LoadedWorker, context: int, n: int) -> float:
    """Tokens/s of LONG_BATCH rows with prompts of ~`context` tokens, while every row is decoding
    (from the last one's first token to the first one's last)."""
    streams = Streams(worker)
    ids = [streams.submit(prompt_of(worker, context, i), n) for i in range(LONG_BATCH)]
    streams.wait()
    return tokens_per_s_while_all_run(streams, ids)


def tokens_per_s_while_all_run(streams: Streams, ids: list[str]) -> float:
    """Tokens/s of rows `ids` from the last one's first token to the first one's last."""
    start = max(streams.times[i][0] for i in ids)
    end = min(streams.times[i][-1] for i in ids)

    def tokens_at(request_id: str, moment: float) -> int:
        return max((k for t, k in zip(streams.times[request_id], streams.tokens[request_id], strict=True)
                    if t <= moment), default=0)

    return sum(tokens_at(i, end) - tokens_at(i, start) for i in ids) / (end - start)


def long_context_lines(worker: LoadedWorker, n: int, rounds: int) -> list[Row]:
    speeds = interleaved(rounds, {
        "short": lambda: decode_speed(worker, SHORT_CONTEXT, n),
        "long": lambda: decode_speed(worker, LONG_CONTEXT, n),
    })  # fmt: skip
    ratio = speeds["long"] / speeds["short"]
    return [
        Row("c", f"decode, prompts of ~{SHORT_CONTEXT} tokens, {n} new", LONG_BATCH, speeds["short"], "tok/s", "1.00"),
        Row("c", f"decode, prompts of ~{LONG_CONTEXT} tokens, {n} new", LONG_BATCH, speeds["long"], "tok/s",
            f"{ratio:.2f}", "≥ 0.70"),
    ]


# -- (e) inter-token latency during a long admission ----------------------------------------------
def admission_latency_lines(worker: LoadedWorker, rounds: int) -> list[Row]:
    """STREAMS rows decode; once each has 8 tokens, a ~2,000-token prompt arrives. The gaps between
    the streams' tokens before it arrived (steady) and while it was prefilled, p50 and p99.

    Only gaps between events one token apart count: an event that carries several tokens (text
    held back until a character is whole) says nothing about the engine's steps.
    """
    steady, p50s, p99s, first_token = [], [], [], []
    for _ in range(rounds):
        streams = Streams(worker)
        ids = [streams.submit(PROMPTS[i], 64) for i in range(STREAMS)]
        while min(len(streams.times[i]) for i in ids) < 8:
            time.sleep(0.01)
        arrived = time.perf_counter()
        long_id = streams.submit(prompt_of(worker, ADMITTED_PROMPT, 0), 4)
        streams.wait()
        admitted = streams.times[long_id][0]  # its first token: its prefill is done
        gaps = [(t, t - before) for i in ids
                for (before, k0), (t, k1) in pairwise(zip(streams.times[i], streams.tokens[i], strict=True))
                if k1 - k0 == 1]
        during = [gap for t, gap in gaps if arrived < t <= admitted]
        steady.append(statistics.median(gap for t, gap in gaps if t <= arrived))
        p50s.append(statistics.median(during))
        p99s.append(_percentile(during, 99))
        first_token.append(admitted - arrived)
    base, p50, p99 = statistics.median(steady), statistics.median(p50s), statistics.median(p99s)
    return [
        Row("e", f"inter-token gap of {STREAMS} streams, p50, before the long prompt", STREAMS, base * 1000, "ms",
            "1.00"),
        Row("e", f"... p50 while a ~{ADMITTED_PROMPT}-token prompt is prefilled", STREAMS, p50 * 1000, "ms",
            f"{p50 / base:.2f}"),
        Row("e", "... p99 then (ratio: to the p50 then; to the p50 before)", STREAMS, p99 * 1000, "ms",
            f"{p99 / p50:.2f}; {p99 / base:.2f}", "≤ 3.00"),
        Row("e", f"the ~{ADMITTED_PROMPT}-token prompt's time to first token", 1,
            statistics.median(first_token) * 1000, "ms"),
    ]


def _percentile(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# -- (h) a JSON-schema row among free rows ---------------------------------------------------------
# Many small objects: the grammar keeps changing state (keys, enums, numbers, strings) to the end.
PEOPLE = {"type": "array", "minItems": 200, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
    "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0},
                   "city": {"enum": ["Paris", "London", "Rome", "Tokyo"]}}}}


def constrained_row_lines(worker: LoadedWorker, n: int, rounds: int, batch: int = 16) -> list[Row]:
    """The free rows' tokens/s in a batch of `batch`, with the last row free or under PEOPLE."""

    def line(constrained: bool) -> Callable[[], float]:
        def run() -> float:
            streams = Streams(worker)
            free = [streams.submit(PROMPTS[i % len(PROMPTS)], n) for i in range(batch - 1)]
            last = streams.submit("List people as JSON.", n, constraint=Constraint(
                type="json_schema", json_schema=PEOPLE) if constrained else None)
            streams.wait()
            assert len(streams.tokens[last]) and streams.tokens[last][-1] == n, "the JSON row ended early"
            return tokens_per_s_while_all_run(streams, free)
        return run

    speeds = interleaved(rounds, {"free": line(False), "schema": line(True)})
    ratio = speeds["schema"] / speeds["free"]
    return [
        Row("h", f"{batch - 1} free rows beside a free row", batch, speeds["free"], "tok/s", "1.00"),
        Row("h", f"{batch - 1} free rows beside a JSON-schema row", batch, speeds["schema"], "tok/s",
            f"{ratio:.2f}", "≥ 0.95"),
    ]


# -- (i) n choices from one prefill ---------------------------------------------------------------
CHOICES = 4
CHOICES_PROMPT = 1000


def choices_lines(worker: LoadedWorker, n: int, rounds: int) -> list[Row]:
    """Wall time for 4 answers of one ~1,000-token prompt: one request with n=4, or four requests."""
    prompt = prompt_of(worker, CHOICES_PROMPT, seed=5)

    def line(together: bool) -> Callable[[], float]:
        def run() -> float:
            streams = Streams(worker)
            started = time.perf_counter()
            if together:
                streams.submit(prompt, n, n=CHOICES, temperature=0.8)
            else:
                for _ in range(CHOICES):
                    streams.submit(prompt, n, temperature=0.8)  # sampled alike: four different answers too
            streams.wait()
            return CHOICES * n / (time.perf_counter() - started)
        return run

    speeds = interleaved(rounds, {"apart": line(False), "together": line(True)})
    return [
        Row("i", f"{CHOICES} requests of one {CHOICES_PROMPT}-token prompt", CHOICES, speeds["apart"], "tok/s",
            "1.00"),
        Row("i", f"one request, n={CHOICES} (one prefill, KV copied)", CHOICES, speeds["together"], "tok/s",
            f"{speeds['together'] / speeds['apart']:.2f}", "> 1"),
    ]
