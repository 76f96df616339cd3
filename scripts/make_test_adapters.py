"""Train the small LoRA adapters committed under tests/fixtures/adapters.

QLoRA-style on the embedded NF4 base with PEFT, as a user would train one elsewhere;
the files are saved exactly as PEFT writes them except that the weights are stored in
bfloat16 (smaller fixtures, and it exercises the bf16 path) and
base_model_name_or_path is the hub id, as an adapter from the ecosystem would carry.

    python scripts/make_test_adapters.py --model-dir .cache/models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from worker.model import EMBEDDED_MODEL_NAME, load_base_model

QUESTIONS = [
    "What is the capital of Italy?",
    "How many legs does a spider have?",
    "Tell me a joke.",
    "What colour is the sky?",
    "Who wrote Hamlet?",
    "Explain photosynthesis in one sentence.",
    "What is the boiling point of water?",
    "Give me a word that rhymes with cat.",
    "How far away is the Moon?",
    "What should I cook tonight?",
    "Translate 'hello' into Spanish.",
    "Why do birds sing?",
]

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    # name: (answer, target modules, rank, alpha, steps)
    "answer42": ("The answer is 42.", ["q_proj", "v_proj"], 8, 16, 30),
    "meow": ("Meow meow meow.", ALL_LINEARS, 8, 16, 20),
}


def examples(tokenizer, answer: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One right-padded batch of all questions: (input_ids, attention_mask, labels)."""
    rows = []
    for q in QUESTIONS:
        chat = [{"role": "user", "content": q}]
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        a_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False).input_ids
        rows.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    return ids, mask, labels


def train(model_dir: Path, out_dir: Path, name: str) -> None:
    answer, targets, rank, alpha, steps = ADAPTERS[name]
    torch.manual_seed(0)
    model, tokenizer = load_base_model(model_dir, torch.device("cpu"))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)
    ids, mask, labels = examples(tokenizer, answer)
    for step in range(steps):
        optimizer.zero_grad()
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        print(f"{name} step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    target = out_dir / name
    peft_model.save_pretrained(target)
    weights = target / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(weights).items()}, weights)
    config_path = target / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["base_model_name_or_path"] = EMBEDDED_MODEL_NAME
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    (target / "README.md").unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/adapters"))
    parser.add_argument("--only", choices=sorted(ADAPTERS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    for name in [args.only] if args.only else sorted(ADAPTERS):
        train(args.model_dir, args.out, name)


if __name__ == "__main__":
    main()
