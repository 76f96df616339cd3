"""What each adapter slot dtype (`LORA_DTYPE`) does to the answers, against float32 slots (the files' values).

    python -m bench.slot_quality

One worker per dtype on the embedded model, the same adapters in each: the two trained fixtures
(tests/fixtures/adapters: answer42, meow) and random ones strong enough to change every answer:
Gaussian weights, and heavy-tailed ones (Student's t with 4, 3 and 2 degrees of freedom: a few weights
in each row far above the rest, the hard case for int8's one scale a row). For each adapter, the
16 bench prompts as chat requests:

- teacher-forced: every token of prompt + float32's greedy answer scored by each dtype
  (`prompt_logprobs`): the log probability's difference from float32's, mean / p99 / max, and how
  often the most likely next token differs;
- free-running: greedy answers of 48 tokens, how many equal float32's word for word, and where
  the others first part from it (in tokens).

and for int8, what its rounding loses of each adapter's weights (`worker.cpu_lora.rounding_error`
of the worst layer: what `LORA_INT8_MAX_ERROR` limits; the bench's workers run with it lifted, so
that every adapter is served). Prints a table; nothing here is timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from adapters.blobstore import LocalBlobStore
from adapters.peft_format import module_scaling, parse_config
from bench.common import ALL_LINEARS, PROMPTS, Row, print_table, write_adapter
from bench.engine_bench import start_worker, store
from worker.config import LoraDtype, WorkerConfig
from worker.cpu_lora import lora_delta_kernel, rounding_error
from worker.model import prepare_embedded_model
from worker.protocol import AdapterRef, ChatMessage, GenerateEvent, GenerateRequest, SamplingParams
from worker.runtime import LoadedWorker

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "adapters"
RANK = 16
NEW_TOKENS = 48
Scores = list[list[tuple[float, str]]]  # `scored`'s
Answers = list[tuple[str, list[str]]]  # greedy answers: text and tokens


def gaussian(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.standard_normal(shape)


def student_t(dof: int) -> Callable[[np.random.Generator, tuple[int, int]], np.ndarray]:
    """Heavy-tailed weights: the largest of a 576-wide row of t(2) draws is typically ~10x the row's rms
    (Gaussian: ~3x), the hard case for one scale a row."""
    return lambda rng, shape: rng.standard_t(dof, shape) / np.sqrt(dof / (dof - 2) if dof > 2 else 4.0)


def run_all(worker: LoadedWorker, requests: list[GenerateRequest]) -> list[list[GenerateEvent]]:
    """Every request at once (the engine batches them); each one's events."""
    events: list[list[GenerateEvent]] = [[] for _ in requests]
    left = len(requests)
    done = threading.Event()
    lock = threading.Lock()

    def sink_of(i: int) -> Callable[[GenerateEvent], None]:
        def sink(event: GenerateEvent) -> None:
            nonlocal left
            events[i].append(event)
            if event.finished:
                if event.error:
                    raise RuntimeError(event.error)
                with lock:
                    left -= 1
                    if left == 0:
                        done.set()
        return sink

    for i, request in enumerate(requests):
        worker.engine.submit(request, worker.prompts.encode(request), sink_of(i))
    if not done.wait(1800):
        raise RuntimeError("the requests did not finish")
    return events


def answers(worker: LoadedWorker, cases: list[tuple[AdapterRef, str]]) -> Answers:
    """Each case's greedy answer: its text and its tokens."""
    sampling = SamplingParams(max_tokens=NEW_TOKENS, logprobs=0)
    requests = [GenerateRequest(request_id=uuid.uuid4().hex, messages=[ChatMessage(role="user", content=prompt)],
                                adapter=ref, sampling=sampling) for ref, prompt in cases]
    results = []
    for events in run_all(worker, requests):
        tokens = [lp.token for e in events for lp in (e.logprobs or [])]
        results.append(("".join(e.text for e in events), tokens))
    return results


def scored(worker: LoadedWorker, cases: Sequence[tuple[AdapterRef | None, str]]) -> Scores:
    """Each case's text scored token by token: (log probability of the token, the most likely token there)."""
    sampling = SamplingParams(max_tokens=1, prompt_logprobs=1)
    requests = [GenerateRequest(request_id=uuid.uuid4().hex, prompt=text, adapter=ref, sampling=sampling)
                for ref, text in cases]
    results = []
    for events in run_all(worker, requests):
        prompt = next(e.prompt_logprobs for e in events if e.prompt_logprobs)
        results.append([(p.logprob, p.top[0].token) for p in prompt[1:] if p.logprob is not None])
    return results


def int8_rounding(directory: Path) -> float:
    """What int8 slots would lose of the adapter's weights: `rounding_error` of its worst layer (the
    measure LORA_INT8_MAX_ERROR limits)."""
    config = parse_config((directory / "adapter_config.json").read_bytes())
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    worst = 0.0
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            b, module = tensors[key.replace("lora_A", "lora_B")], key.removesuffix(".lora_A.weight")
            scale = module_scaling(config, module, a.shape[0])
            worst = max(worst, rounding_error(a.float(), b.T.float() * scale))
    return worst


def first_difference(a: list[str], b: list[str]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))



def agreement_rows(what: str, forced: Scores, forced_ref: Scores, free: Answers, free_ref: Answers) -> list[Row]:
    """How far `what`'s scores and greedy answers are from the reference's (float32's), case by case."""
    pairs = [(mine, ref) for case, case_ref in zip(forced, forced_ref, strict=True)
             for mine, ref in zip(case, case_ref, strict=True)]
    gaps = [abs(mine[0] - ref[0]) for mine, ref in pairs]
    flips = [mine[1] != ref[1] for mine, ref in pairs]
    same = sum(x[0] == y[0] for x, y in zip(free, free_ref, strict=True))
    parted = [first_difference(x[1], y[1]) for x, y in zip(free, free_ref, strict=True) if x[0] != y[0]]
    return [
        Row("q", f"{what}: |logprob - float32's|, mean", len(gaps), 1000 * statistics.fmean(gaps), "mnats"),
        Row("q", f"{what}: |logprob - float32's|, p99 / max", len(gaps),
            1000 * float(np.quantile(gaps, 0.99)), "mnats", f"max {1000 * max(gaps):.0f}"),
        Row("q", f"{what}: most likely next token differs", len(flips), 100 * statistics.fmean(flips), "%"),
        Row("q", f"{what}: greedy answers equal to float32's", len(free), same, "answers",
            f"others part at token {statistics.median(parted):.0f} (median)" if parted else ""),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--models-dir", type=Path, default=Path(os.environ.get("LORAPLEX_MODELS_DIR", "data/models")))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    dtypes: list[LoraDtype] = ["float32", "bfloat16"]
    if lora_delta_kernel() is not None:
        dtypes.append("int8")
    prepared = prepare_embedded_model(args.models_dir)
    tokenizer = AutoTokenizer.from_pretrained(prepared.path)
    work = Path(tempfile.mkdtemp(prefix="loraplex-quality-"))
    blobs = LocalBlobStore(work / "blobs")
    directories = {
        "answer42 (trained)": FIXTURES / "answer42",
        "meow (trained)": FIXTURES / "meow",
        **{what: write_adapter(work / key, prepared.linear_modules, RANK, ALL_LINEARS, seed, draw=draw, b_size=0.1)
           for what, key, seed, draw in (("Gaussian", "gaussian", 7, gaussian),
                                         ("Student's t, 4 dof", "t4", 8, student_t(4)),
                                         ("Student's t, 3 dof", "t3", 10, student_t(3)),
                                         ("Student's t, 2 dof", "t2", 9, student_t(2)))},
    }
    adapters = {what: store(blobs, directory, directory.name) for what, directory in directories.items()}
    cases = [(name, ref, prompt) for name, ref in adapters.items() for prompt in PROMPTS]
    free: dict[str, list[tuple[str, list[str]]]] = {}
    forced: dict[str, list[list[tuple[float, str]]]] = {}
    texts: list[tuple[AdapterRef, str]] = []
    for dtype in dtypes:
        runtime = start_worker(WorkerConfig(
            model_path=prepared.path, model_name=prepared.name, blob_url=str(blobs.root), torch_threads=args.threads,
            max_batch_size=16, adapter_slots=len(adapters), max_lora_rank=RANK, lora_dtype=dtype,
            lora_int8_max_error=1.0,
        ))  # fmt: skip
        assert runtime.loaded is not None
        free[dtype] = answers(runtime.loaded, [(ref, prompt) for _, ref, prompt in cases])
        if not texts:  # float32's answers, in the chat template, for every dtype to score
            texts = [(ref, str(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                             add_generation_prompt=True)) + answer)
                     for (_, ref, prompt), (answer, _) in zip(cases, free[dtype], strict=True)]
        forced[dtype] = scored(runtime.loaded, texts)
        runtime.stop()
    rows = []
    for dtype in dtypes[1:]:
        for name in adapters:
            index = [i for i, case in enumerate(cases) if case[0] == name]
            what = f"{dtype}, {name}"
            if dtype == "int8":
                rows.append(Row("q", f"{what}: rounding's loss, worst layer (LORA_INT8_MAX_ERROR)", "",
                                100 * int8_rounding(directories[name]), "%"))
            rows += agreement_rows(what, [forced[dtype][i] for i in index], [forced["float32"][i] for i in index],
                                   [free[dtype][i] for i in index], [free["float32"][i] for i in index])
    print(f"\nAdapter slot dtypes against float32 slots: {len(PROMPTS)} chat prompts an adapter, "
          f"{NEW_TOKENS} greedy tokens, rank {RANK} on all seven linears")
    print_table(rows)


if __name__ == "__main__":
    main()
