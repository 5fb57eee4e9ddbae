"""`make demo`: what glm5 can do today, end to end, on a laptop CPU in about three minutes.

1. The real GLM-5: parameter, memory and KV-cache accounting of the 744B model (built on the meta device).
2. A GLM tokenizer trained offline on the CPython standard library, and a chat rendered in the GLM-5 format.
3. A ~12M-parameter GLM-5-shaped model (MLA + DSA sparse attention + MoE + MTP) trained for a minute on that
   text: LM + MTP + indexer losses, aux-loss-free router balancing; the loss curve goes to a PNG.
4. Greedy generation with the latent KV cache (absorbed MLA, sparse decode), and, when transformers is
   installed, the trained weights checked against the HF reference implementation.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from glm5 import GLM5Config, GLM5ForCausalLM
from glm5.model import ContiguousLatentCache
from glm5.plan import format_table, parameter_table
from glm5.tokenizer import GLM5Tokenizer, parse_output, render_chat
from glm5.tokenizer.tokenizer import default_corpus_files

console = Console()


def corpus_tokens(tok: GLM5Tokenizer, files: list[Path], max_tokens: int) -> torch.Tensor:
    """Encode files (shuffled deterministically) until max_tokens; documents separated by <|endoftext|>."""
    files = sorted(files)
    random.Random(0).shuffle(files)
    ids: list[int] = []
    eos = tok.token_to_id("<|endoftext|>")
    for path in files:
        ids += tok.encode(path.read_text(encoding="utf-8", errors="replace")) + [eos]
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens])


def train(model: GLM5ForCausalLM, data: torch.Tensor, steps: int, batch: int, seq: int) -> list[float]:
    """A compact pre-training loop: LM + 0.3 * MTP + indexer KL, AdamW with warm-up and cosine decay."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    losses: list[float] = []
    columns = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]  # fmt: skip
    model.train()
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=steps, info="")
        for step in range(steps):
            lr = 3e-3 * min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in opt.param_groups:
                group["lr"] = lr
            starts = torch.randint(0, len(data) - seq - 2, (batch,), generator=gen)
            x = torch.stack([data[s : s + seq + 2] for s in starts.tolist()])
            start = time.perf_counter()
            out = model(x[:, :seq], mtp_depth=1, return_stats=True)
            lm = F.cross_entropy(out.logits.flatten(0, 1), x[:, 1 : seq + 1].flatten())
            mtp = F.cross_entropy(out.mtp_logits[0].flatten(0, 1), x[:, 2 : seq + 2].flatten())
            indexer = sum(s.indexer_loss for s in out.stats if s.indexer_loss is not None)
            (lm + 0.3 * mtp + 0.01 * indexer).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():  # aux-loss-free balancing: raise the bias of under-loaded experts
                for s in out.stats:
                    if s.router is not None:
                        layer = model.mtp[0] if s.mtp_depth is not None else model.model.layers[s.layer_idx]
                        load = s.router.expert_load
                        layer.mlp.gate.e_score_correction_bias += 1e-3 * torch.sign(load.mean() - load)
            losses.append(lm.item())
            tok_s = batch * seq / (time.perf_counter() - start)
            progress.update(task, advance=1, info=f"loss {lm.item():.3f}  mtp {mtp.item():.3f}  {tok_s:,.0f} tok/s")
    model.eval()
    return losses


@torch.no_grad()
def generate(model: GLM5ForCausalLM, prompt: list[int], max_new: int, stop: set[int]) -> list[int]:
    """Greedy decoding with the latent KV cache: one prefill, then one token per step (absorbed MLA)."""
    cache = ContiguousLatentCache(model.config, batch_size=1, max_len=len(prompt) + max_new)
    logits = model(torch.tensor([prompt]), cache, num_logits_to_keep=1).logits
    out: list[int] = []
    for _ in range(max_new):
        nxt = int(logits[0, -1].argmax())
        if nxt in stop:
            break
        out.append(nxt)
        logits = model(torch.tensor([[nxt]]), cache).logits
    return out


def save_plot(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, label="LM loss")
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="glm5 tiny: training on the CPython stdlib")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def check_against_transformers(model: GLM5ForCausalLM, ids: torch.Tensor) -> float | None:
    try:
        import transformers
    except ImportError:
        return None
    hf_cfg = transformers.GlmMoeDsaConfig(**model.config.to_hf_config())
    ref = transformers.GlmMoeDsaForCausalLM(hf_cfg).eval()
    ref.load_state_dict(model.hf_state_dict(fused_experts=True), strict=False)
    with torch.no_grad():
        return (ref(ids).logits - model(ids).logits).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="glm5 end-to-end demo")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    console.rule("[bold]1. The real GLM-5 (744B MoE), accounted on the meta device")
    console.print(format_table(parameter_table(GLM5Config.from_preset("glm-5")), title="glm-5"))

    console.rule("[bold]2. A GLM tokenizer trained offline on the CPython standard library")
    files = default_corpus_files()
    start = time.perf_counter()
    tok = GLM5Tokenizer.train(files, vocab_size=8192)
    console.print(f"BPE with {tok.vocab_size:,} tokens (GLM special tokens included) from {len(files)} files "
                  f"in {time.perf_counter() - start:.1f} s; eos ids {tok.eos_token_ids}")  # fmt: skip
    messages = [{"role": "system", "content": "You are a Python expert."},
                {"role": "user", "content": "Write a function that reverses a list."}]  # fmt: skip
    console.print("chat render:", repr(render_chat(messages)), markup=False)  # [gMASK] is not rich markup

    console.rule("[bold]3. Train a GLM-5-shaped model (MLA + DSA + MoE + MTP)")
    cfg = GLM5Config.from_preset("tiny").replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_ids,
                                                 pad_token_id=tok.pad_token_id)  # fmt: skip
    model = GLM5ForCausalLM(cfg)
    data = corpus_tokens(tok, files, max_tokens=400_000)
    console.print(f"{model.num_parameters(include_mtp=False) / 1e6:.1f}M parameters (+{(model.num_parameters() - model.num_parameters(False)) / 1e6:.1f}M MTP), "
                  f"{len(data):,} training tokens, index_topk={cfg.index_topk} < 256-token sequences: sparse attention")  # fmt: skip
    losses = train(model, data, steps=args.steps, batch=8, seq=256)
    save_plot(losses, args.out / "loss.png")
    final = sum(losses[-5:]) / len(losses[-5:])
    console.print(f"LM loss {losses[0]:.2f} -> {final:.2f} nats (mean of the last 5 steps); curve: {args.out / 'loss.png'}")

    console.rule("[bold]4. Generate with the latent KV cache, and check against transformers")
    prompt = tok.encode("def reverse_list(items):\n    ")
    start = time.perf_counter()
    new = generate(model, prompt, max_new=40, stop=set(tok.eos_token_ids))
    rate = len(new) / (time.perf_counter() - start)
    console.print(f"completion ({rate:.0f} tok/s):", repr(tok.decode(prompt + new)), markup=False)
    diff = check_against_transformers(model, data[None, :300])
    if diff is not None:
        console.print(f"trained weights in HF transformers' GlmMoeDsaForCausalLM: max |logits diff| = {diff:.1e}")
    sample = "Reverse it.</think>Sure.<tool_call>run<arg_key>code</arg_key><arg_value>x[::-1]</arg_value></tool_call>"
    console.print("parsed output:", parse_output(sample))
    return 0


if __name__ == "__main__":
    sys.exit(main())
