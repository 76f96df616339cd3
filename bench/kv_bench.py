"""What a bfloat16 KV pool (`KV_CACHE_DTYPE=bfloat16`) does to long rows' speed and to the answers,
against the default (the model's float32 on the CPU).

    python -m bench.kv_bench

One worker at a time on the embedded model (two in one process slow each other), each KV dtype once
in each of `--rounds` rounds, alternating:

- speed: (c) of `make bench`, decode tokens/s of 8 rows with prompts of ~1,000 tokens against the same
  batch at ~64, the ratio taken within each worker's round (medians of the rounds);
- answers: 8 prompts of ~1,000 tokens, teacher-forced (each token scored given the ones before it:
  how far the log probability moves, how often the most likely next token changes) and free-running
  (48 greedy tokens: how many answers stay word for word, where the others part).

~15 minutes on 2 CPU cores with `--rounds 2`. Not part of `make bench`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import uuid
from pathlib import Path

import torch

from bench.common import Row, print_table
from bench.engine_bench import start_worker
from bench.slot_quality import Answers, Scores, agreement_rows, run_all, scored
from bench.workloads import LONG_BATCH, LONG_CONTEXT, SHORT_CONTEXT, decode_speed, prompt_of
from worker.config import KvCacheDtype, WorkerConfig
from worker.model import prepare_embedded_model
from worker.protocol import GenerateRequest, SamplingParams
from worker.runtime import LoadedWorker

NEW_TOKENS = 48


def greedy(worker: LoadedWorker, prompts: list[str]) -> Answers:
    """Each prompt's greedy continuation: its text and its tokens."""
    sampling = SamplingParams(max_tokens=NEW_TOKENS, logprobs=0)
    requests = [GenerateRequest(request_id=uuid.uuid4().hex, prompt=p, sampling=sampling) for p in prompts]
    return [("".join(e.text for e in events), [lp.token for e in events for lp in (e.logprobs or [])])
            for events in run_all(worker, requests)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=256,
                        help="new tokens per row in the speed lines (as (c) of make bench: rows must overlap)")
    parser.add_argument("--models-dir", type=Path, default=Path(os.environ.get("LORAPLEX_MODELS_DIR", "data/models")))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    prepared = prepare_embedded_model(args.models_dir)
    blobs = tempfile.mkdtemp(prefix="loraplex-kv-")  # no adapters: base rows only
    dtypes: tuple[KvCacheDtype, ...] = ("auto", "bfloat16")
    speeds: dict[KvCacheDtype, dict[str, list[float]]] = {d: {"short": [], "long": [], "ratio": []} for d in dtypes}
    free: dict[KvCacheDtype, Answers] = {}
    forced: dict[KvCacheDtype, Scores] = {}
    for round_ in range(args.rounds):
        for dtype in dtypes:
            runtime = start_worker(WorkerConfig(
                model_path=prepared.path, model_name=prepared.name, blob_url=blobs,
                torch_threads=args.threads, max_batch_size=16, kv_cache_dtype=dtype,
            ))  # fmt: skip
            worker = runtime.loaded
            assert worker is not None
            short, long = (decode_speed(worker, context, args.new_tokens) for context in (SHORT_CONTEXT, LONG_CONTEXT))
            for name, value in (("short", short), ("long", long), ("ratio", long / short)):
                speeds[dtype][name].append(value)
            if round_ == 0:
                prompts = [prompt_of(worker, LONG_CONTEXT, i) for i in range(LONG_BATCH)]
                free[dtype] = greedy(worker, prompts)
                forced[dtype] = scored(worker, [(None, p + answer) for p, (answer, _) in zip(prompts, free["auto"],
                                                                                          strict=True)])
            runtime.stop()
    rows = []
    for dtype in dtypes:
        what = f"KV {dtype}" + (" (float32)" if dtype == "auto" else "")
        median = {name: statistics.median(values) for name, values in speeds[dtype].items()}
        rows += [
            Row("c", f"{what}: decode, prompts of ~{SHORT_CONTEXT} tokens", LONG_BATCH, median["short"], "tok/s"),
            Row("c", f"{what}: decode, prompts of ~{LONG_CONTEXT} tokens", LONG_BATCH, median["long"], "tok/s",
                f"{median['ratio']:.2f} of ~{SHORT_CONTEXT}", "≥ 0.70"),
        ]
    ratio = [b / a for a, b in zip(speeds["auto"]["long"], speeds["bfloat16"]["long"], strict=True)]
    rows.append(Row("c", f"bfloat16 / float32 at ~{LONG_CONTEXT} tokens (same round)", LONG_BATCH,
                    statistics.median(ratio), "x", " ".join(f"{r:.2f}" for r in ratio)))
    rows += agreement_rows("KV bfloat16", forced["bfloat16"], forced["auto"], free["bfloat16"], free["auto"])
    print(f"\nKV pool dtypes, {LONG_BATCH} rows, {args.new_tokens} new tokens in the speed lines, "
          f"{NEW_TOKENS} in the answers, {args.rounds} rounds")
    print_table(rows)


if __name__ == "__main__":
    main()
