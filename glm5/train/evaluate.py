"""End-of-training checks: validation loss against a unigram baseline, greedy samples (code and chat, with one
calculator round trip), accuracy on held-out synthetic tasks, and the export in the HF layout.

Greedy decoding here uses the model's latent KV cache directly; the serving engine is a separate component.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from glm5.data.packing import IGNORE, PackedSequences
from glm5.data.tasks import Task, calculator, check_answer, generate_tasks
from glm5.data.tokens import TokenFile
from glm5.model import ContiguousLatentCache, GLM5ForCausalLM
from glm5.tokenizer import GLM5Tokenizer, parse_output

CODE_PROMPTS = ("def fibonacci(n):\n", "import os\n\n\nclass ", "    def __init__(self, ")
"""Plain-text prompts for code samples (the corpus is Python source)."""


def val_indices(data: PackedSequences, num_batches: int, batch_size: int) -> list[list[int]]:
    """Fixed validation batches: windows spread evenly over the split (the same every evaluation)."""
    n = min(len(data), num_batches * batch_size)
    picks = np.linspace(0, len(data) - 1, n).round().astype(int).tolist()
    return [picks[i : i + batch_size] for i in range(0, n, batch_size)]


def unigram_baseline(
    train: TokenFile, val: PackedSequences, batches: list[list[int]], vocab_size: int
) -> float:
    """Cross-entropy (nats) of the validation targets under the training unigram distribution (add-one
    smoothing): what a model that ignores context would score."""
    counts = train.unigram_counts(vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    total, n = 0.0, 0
    for idx in batches:
        targets = val.batch(idx).targets.numpy().ravel()
        targets = targets[targets != IGNORE]
        total -= float(log_p[targets].sum())
        n += len(targets)
    return total / max(n, 1)


@torch.no_grad()
def generate(model: GLM5ForCausalLM, prompt: list[int], max_new: int, stop: set[int]) -> list[int]:
    """Greedy decoding: one prefill, then one token per step through the latent cache (absorbed MLA)."""
    device = model.device
    cache = ContiguousLatentCache(model.config, batch_size=1, max_len=len(prompt) + max_new, device=device)
    logits = model(torch.tensor([prompt], device=device), cache, num_logits_to_keep=1).logits
    out: list[int] = []
    for _ in range(max_new):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt in stop:
            break
        logits = model(torch.tensor([[nxt]], device=device), cache).logits
    return out


def chat_reply(model: GLM5ForCausalLM, tok: GLM5Tokenizer, task: Task, max_new: int) -> dict[str, Any]:
    """Answer a task's prompt; a calculator call is executed once and the model continues after the result."""
    messages = list(task.prompt_messages)
    stop = set(tok.eos_token_ids)
    transcript = ""
    for _ in range(2):
        ids, _ = tok.apply_chat_template(messages, task.tools)
        new = generate(model, ids, max_new, stop)
        text = tok.decode([i for i in new if i not in stop])
        transcript += text
        parsed = parse_output(text, task.tools)
        calls = parsed.get("tool_calls") or []
        if not calls or new[-1:] != [tok.token_to_id("<|observation|>")]:
            return {"reply": parsed.get("content") or "", "transcript": transcript}
        args = json.loads(calls[0]["function"]["arguments"] or "{}")
        result = calculator(str(args.get("expression", "")))
        transcript += f"<|observation|><tool_response>{result}</tool_response>"
        messages += [
            {
                "role": "assistant",
                "content": parsed.get("content") or "",
                "reasoning_content": parsed.get("reasoning_content"),
                "tool_calls": calls,
            },
            {"role": "tool", "content": result},
        ]
    return {"reply": "", "transcript": transcript}


def evaluate_samples(
    model: GLM5ForCausalLM, tok: GLM5Tokenizer, max_new: int, counts: dict[str, int], seed: int = 12_345
) -> dict[str, Any]:
    """Code completions for CODE_PROMPTS, and per-kind accuracy on freshly generated (unseen-seed) chat tasks."""
    model.eval()
    stop = set(tok.eos_token_ids)
    code = []
    for prompt in CODE_PROMPTS:
        new = generate(model, tok.encode(prompt), max_new, stop)
        code.append({"prompt": prompt, "completion": tok.decode(new)})
    chats, correct = [], {}
    for task in generate_tasks(counts, seed):
        out = chat_reply(model, tok, task, max_new)
        ok = check_answer(task, out["reply"])
        correct.setdefault(task.kind, []).append(ok)
        chats.append(
            {
                "kind": task.kind,
                "prompt": task.prompt_messages[-1]["content"],
                "expected": task.answer,
                "correct": ok,
                **out,
            }
        )
    accuracy = {kind: sum(v) / len(v) for kind, v in sorted(correct.items())}
    return {"code": code, "chat": chats, "accuracy": accuracy}


def lm_loss_sums(
    model: GLM5ForCausalLM, data: PackedSequences, batches: list[list[int]], device, autocast
) -> torch.Tensor:  # noqa: ANN001
    """[sum of next-token cross-entropy, number of targets] over `batches` (float64, for all-reduce)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for idx in batches:
            batch = data.batch(idx)
            with autocast():
                logits = model(batch.input_ids.to(device)).logits
            targets = batch.targets.to(device)
            total[0] += F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
            ).double()
            total[1] += (targets != IGNORE).sum()
    return total


def export_hf(model: GLM5ForCausalLM, tok: GLM5Tokenizer, folder: str | Path) -> Path:
    """The published layout (config.json + safetensors with HF names, written atomically) + tokenizer files."""
    folder = Path(folder)
    model.save_pretrained(str(folder))
    tok.save_pretrained(folder)
    return folder


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
