"""QLoRA fine-tuning of one job: LoRA weights trained with PEFT on the frozen NF4 base the workers serve.

Run as a child process of the job runner (`python -m worker.finetune PLAN.json OUT_DIR`), so that
cancelling a job is killing a process and a crash never takes the runner with it. It reads the
job's files again (as the gateway checked them), tokenizes them with the chat template exactly as
serving applies it, trains with the loss on the assistant's tokens only, evaluates, and writes
`adapter/` (PEFT's files) and `report.json` into OUT_DIR. Progress goes to stdout as
`PROGRESS <stage> <done> <total>` lines, events (the loss at each step) as `EVENT <json>` lines;
a refusal is `FAILED <json>` with the message the tenant sees, then exit status 3.

The model stays in training mode throughout, evaluation included: bitsandbytes repacks its 4-bit
weights for the CPU on the first forward in eval mode, and the `state_dict()` that saving calls
would then unpack them in place under the model (the bug docs/architecture.md describes).
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from worker.finetune_spec import FAILED_EXIT, FineTuneSpec, TrainingPlan
from worker.job_child import deliver, progress, run_and_exit
from worker.training_data import Example, TrainingDataError, encode, read_examples

PROBE_TOKENS = 32


class Refused(Exception):
    """The job cannot run as asked (its files, its limits): the tenant's error, not a crash."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def event(message: str, kind: str = "message", data: dict[str, Any] | None = None) -> None:
    print("EVENT " + json.dumps({"message": message, "type": kind, "data": data}), flush=True)


def load_examples(path: str, which: str, max_examples: int, tokenizer: Any, max_tokens: int,
                  max_total: tuple[int, str] | None = None) -> list[tuple[list[int], list[int]]]:
    """The file's examples tokenized; `max_total`: (a bound on all their tokens, the setting that sets it)."""
    encoded = []
    total = 0
    with open(path, "rb") as lines:
        try:
            for number, turns in enumerate(read_examples(lines, max_examples), start=1):
                ids, labels = _encoded(tokenizer, turns, which, number)
                if len(ids) > max_tokens:
                    raise Refused("invalid_file", f"{which} file example {number}: {len(ids)} tokens, over the "
                                  f"limit of {max_tokens} (the base model's context, or max_example_tokens)")
                total += len(ids)
                if max_total is not None and total > max_total[0]:
                    raise Refused("invalid_file", f"{which} file: over {max_total[0]} tokens by example {number}, "
                                  f"the limit ({max_total[1]}); it is evaluated before and after training")
                encoded.append((ids, labels))
        except TrainingDataError as exc:
            raise Refused("invalid_file", f"{which} file {exc}") from None
    return encoded


def _encoded(tokenizer: Any, turns: Example, which: str, number: int) -> tuple[list[int], list[int]]:
    try:
        ids, labels = encode(tokenizer, turns)
    except TrainingDataError as exc:
        raise Refused("invalid_file", f"{which} file example {number}: {exc}") from None
    if all(label == -100 for label in labels):
        raise Refused("invalid_file", f"{which} file example {number}: no assistant token left to learn from")
    return ids, labels


def batch(rows: list[tuple[list[int], list[int]]], pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows], device=device)
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows], device=device)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def micro_batches(rows: list[tuple[list[int], list[int]]], max_tokens: int) -> list[list[tuple[list[int], list[int]]]]:
    """`rows` in order, cut into runs whose padded size (rows x the longest) is at most `max_tokens`, one row
    at least: memory follows the padded tokens of a forward pass, whatever batch_size the tenant chose."""
    chunks: list[list[tuple[list[int], list[int]]]] = []
    width = 0
    for row in rows:
        grown = max(width, len(row[0]))
        if chunks and grown * (len(chunks[-1]) + 1) <= max_tokens:
            chunks[-1].append(row)
            width = grown
        else:
            chunks.append([row])
            width = len(row[0])
    return chunks


def learned_tokens(rows: list[tuple[list[int], list[int]]]) -> int:
    """Label tokens the loss averages over (each label predicts from the tokens before it)."""
    return sum(sum(1 for label in lab[1:] if label != -100) for _, lab in rows)


def mean_loss(model: Any, rows: list[tuple[list[int], list[int]]], pad: int, device: torch.device,
              max_tokens: int) -> float:
    """Loss per assistant token over `rows`, without gradients."""
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in micro_batches(rows, max_tokens):
            tokens = learned_tokens(chunk)
            total += float(model(**batch(chunk, pad, device)).loss) * tokens
            count += tokens
    return total / max(count, 1)


def accumulate(model: Any, rows: list[tuple[list[int], list[int]]], pad: int, device: torch.device,
               max_tokens: int) -> float:
    """Gradients of the batch's loss per assistant token, a micro-batch at a time; returns the loss (may
    be non-finite: the caller refuses to step on it). The same gradients as one pass over the batch."""
    total = learned_tokens(rows)
    loss_sum = 0.0
    for chunk in micro_batches(rows, max_tokens):
        share = learned_tokens(chunk) / max(total, 1)
        loss = model(**batch(chunk, pad, device)).loss
        value = float(loss.detach())
        if not math.isfinite(value):
            return value
        (loss * share).backward()
        loss_sum += value * share
    return loss_sum


def answer(model: Any, tokenizer: Any, messages: list[dict[str, str]], device: torch.device) -> str:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=PROBE_TOKENS,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return str(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)).strip()


def probe_messages(path: str) -> list[dict[str, str]]:
    """The first example's conversation up to its first assistant turn: the prompt both models answer."""
    with open(path, "rb") as lines:
        first = next(read_examples(lines, 1))
    upto = next(i for i, t in enumerate(first) if t.role == "assistant")
    return [{"role": t.role, "content": t.content} for t in first[:upto]]


def train(plan: TrainingPlan, out: Path) -> dict[str, Any]:
    from peft import LoraConfig, PeftModel, get_peft_model

    from worker.model import load_base_model, resolve_device

    started = time.monotonic()
    spec = FineTuneSpec(**{**plan.spec, "target_modules": tuple(plan.spec["target_modules"])})
    torch.manual_seed(spec.seed)
    device = resolve_device(plan.device)
    progress("validating_files", 0, 1)
    model, tokenizer = load_base_model(Path(plan.base_path), device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_rows = load_examples(plan.training_file, "training", plan.max_examples, tokenizer, plan.max_example_tokens)
    valid_rows = load_examples(
        plan.validation_file, "validation", plan.max_examples, tokenizer, plan.max_example_tokens,
        (plan.max_validation_tokens, "finetune_max_validation_tokens")) if plan.validation_file else []
    tokens_per_epoch = sum(len(ids) for ids, _ in train_rows)
    trained_tokens = tokens_per_epoch * spec.n_epochs
    if plan.token_budget is not None and trained_tokens > plan.token_budget:
        raise Refused("quota_exceeded", f"this job would train {trained_tokens} tokens ({tokens_per_epoch} x "
                      f"{spec.n_epochs} epochs); the tenant has {plan.token_budget} left of its daily limit "
                      "(finetune_tokens_per_day)")
    steps_per_epoch = math.ceil(len(train_rows) / spec.batch_size)
    total_steps = steps_per_epoch * spec.n_epochs
    event(f"Files validated: {len(train_rows)} training examples ({tokens_per_epoch} tokens), "
          f"{len(valid_rows)} validation examples; {total_steps} steps", data={
              "training_examples": len(train_rows), "validation_examples": len(valid_rows),
              "trained_tokens": trained_tokens, "total_steps": total_steps})
    progress("validating_files", 1, 1)

    if spec.continue_from is not None and plan.init_adapter is not None:
        peft_model = PeftModel.from_pretrained(model, plan.init_adapter, is_trainable=True)
    else:
        config = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha,  # type: ignore[arg-type]  # a float works lora_dropout=spec.lora_dropout,
                            target_modules=list(spec.target_modules), task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
    peft_model.train()  # throughout: see the module's docstring
    probe = probe_messages(plan.validation_file or plan.training_file)
    with peft_model.disable_adapter():
        base_answer = answer(peft_model, tokenizer, probe, device)
    before = mean_loss(peft_model, valid_rows, pad, device, plan.micro_batch_tokens) if valid_rows else None

    event("Fine-tuning job started", data={"total_steps": total_steps})
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 - 0.9 * step / max(total_steps, 1))  # linearly to a tenth
    order = random.Random(spec.seed)
    losses: list[float] = []
    step = 0
    progress("training", 0, total_steps)
    for epoch in range(spec.n_epochs):
        indices = list(range(len(train_rows)))
        order.shuffle(indices)
        for start in range(0, len(indices), spec.batch_size):
            rows = [train_rows[i] for i in indices[start:start + spec.batch_size]]
            optimizer.zero_grad(set_to_none=True)
            loss = accumulate(peft_model, rows, pad, device, plan.micro_batch_tokens)
            if not math.isfinite(loss):
                raise Refused("training_diverged", f"the training loss became {loss} at step {step + 1}; "
                              "lower learning_rate_multiplier")
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            losses.append(round(loss, 4))
            event(f"Step {step}/{total_steps}: training loss={losses[-1]:.4f}", "metrics",
                  {"step": step, "epoch": epoch + 1, "train_loss": losses[-1], "total_steps": total_steps})
            progress("training", step, total_steps)

    progress("evaluating", 0, 1)
    after = mean_loss(peft_model, valid_rows, pad, device, plan.micro_batch_tokens) if valid_rows else None
    result_answer = answer(peft_model, tokenizer, probe, device)
    progress("saving", 0, 1)
    target = out / "adapter"
    peft_model.save_pretrained(str(target), safe_serialization=True)
    saved = json.loads((target / "adapter_config.json").read_text())
    saved["base_model_name_or_path"] = plan.base_name
    (target / "adapter_config.json").write_text(json.dumps(saved, indent=2, sort_keys=True))
    (target / "README.md").unlink(missing_ok=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "trained_tokens": trained_tokens,
        "training_examples": len(train_rows),
        "validation_examples": len(valid_rows),
        "steps": step,
        "epochs": spec.n_epochs,
        "batch_size": spec.batch_size,
        "learning_rate": spec.learning_rate,
        "lora": {"rank": spec.lora_rank, "alpha": spec.lora_alpha, "target_modules": list(spec.target_modules)},
        "train_loss": losses,
        "validation_loss": {"before": _round(before), "after": _round(after)},
        "probe": {"messages": probe, "base_answer": base_answer, "result_answer": result_answer},
        "duration_seconds": round(time.monotonic() - started, 1),
        "peak_memory_bytes": peak,
        "peak_device_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "device": str(device),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def main(argv: list[str]) -> int:
    values = json.loads(Path(argv[0]).read_text())
    plan = TrainingPlan(**{f.name: values[f.name] for f in fields(TrainingPlan) if f.name in values})
    out = Path(argv[1])
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    try:
        report = train(plan, out)
    except Refused as exc:
        print("FAILED " + json.dumps({"code": exc.code, "message": str(exc)}), flush=True)
        return FAILED_EXIT
    return deliver(report, out / "report.json")


if __name__ == "__main__":
    run_and_exit(main)
