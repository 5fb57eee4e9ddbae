"""Where replies come from: `LocalBackend` (a checkpoint or model through the glm5 engine) and `OpenAIBackend`
(any OpenAI-compatible endpoint: `glm5 serve`, vLLM, SGLang or the Z.ai API), behind one small interface.

`chat(requests, n, options)` takes (messages, tools) pairs and returns, per request, n assistant `Reply`s;
the evaluation loop runs the tool calls and calls `chat` again. Only the local backend has logits, so only it
can score held-out perplexity.
"""

from __future__ import annotations

import contextlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from glm5.data.packing import Batch, PackedSequences
from glm5.data.tasks import calculator
from glm5.data.tokens import TokenFile
from glm5.engine import LLM, SamplingParams
from glm5.tokenizer import parse_output
from glm5.train.evaluate import lm_loss_sums, perplexity, val_indices

Request = tuple[list[dict[str, Any]], list[dict[str, Any]] | None]
"""(messages, tools) of one chat request."""


@dataclass
class Reply:
    """One assistant turn."""

    content: str
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """OpenAI shape: {"id", "type": "function", "function": {"name", "arguments": JSON string}}."""
    finish_reason: str | None = None

    def message(self) -> dict[str, Any]:
        """The turn as an OpenAI assistant message, to append to the conversation."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning:
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


@dataclass
class GenerationOptions:
    """Sampling settings shared by every backend."""

    max_tokens: int = 256
    temperature: float = 0.0
    """0 = greedy (the default for accuracy); pass@k with n > 1 samples wants > 0."""
    top_p: float = 1.0
    seed: int | None = 0
    thinking: bool = True
    """Let the model think first (the GLM-5 default)."""


class Backend(Protocol):
    name: str

    def chat(self, requests: list[Request], n: int, options: GenerationOptions) -> list[list[Reply]]: ...


class LocalBackend:
    """Batched generation through `glm5.engine.LLM`, with the GLM-5 chat template and output parser."""

    def __init__(self, model: Any, tokenizer: Any = None, **llm_options: Any) -> None:
        """model: a checkpoint folder, an `LLM`, or a `GLM5ForCausalLM` (then `tokenizer` is required)."""
        if isinstance(model, LLM):
            self.llm = model
        else:
            if isinstance(model, (str, os.PathLike)) and not Path(model).is_dir():
                raise ValueError(
                    f"no checkpoint folder {str(model)!r}; pass --model a folder with config.json, "
                    "*.safetensors and tokenizer.json"
                )
            self.llm = LLM(model, tokenizer, **llm_options)
        if self.llm.tokenizer is None:
            raise ValueError("the local backend needs a tokenizer (tokenizer.json in the checkpoint folder)")
        self.name = f"local:{model}" if isinstance(model, (str, os.PathLike)) else "local:in-memory model"

    @property
    def tokenizer(self) -> Any:
        return self.llm.tokenizer

    def chat(self, requests: list[Request], n: int, options: GenerationOptions) -> list[list[Reply]]:

        tok = self.tokenizer
        prompts = [
            tok.apply_chat_template(m, t, enable_thinking=options.thinking, return_loss_mask=False)
            for m, t in requests
        ]
        params = SamplingParams(
            n=n,
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
            skip_special_tokens=False,
        )
        eos = set(tok.eos_token_ids)
        out = []
        for (_, tools), result in zip(requests, self.llm.generate(prompts, params)):
            replies = []
            for completion in result.outputs:
                text = tok.decode([i for i in completion.token_ids if i not in eos])
                parsed = parse_output(text, tools, options.thinking)
                replies.append(
                    Reply(
                        parsed.get("content") or "",
                        parsed.get("reasoning_content"),
                        parsed.get("tool_calls") or [],
                        completion.finish_reason,
                    )
                )
            out.append(replies)
        return out

    def perplexity(
        self, source: str | os.PathLike, seq_len: int = 256, num_windows: int = 32
    ) -> dict[str, Any]:
        """Next-token perplexity on held-out text: a token folder from the pre-training pipeline (its `val`
        split, loss on its masked targets) or a plain text file. Windows are spread evenly over the source."""
        source = Path(source)
        model = self.llm.model
        if source.is_dir():
            data = PackedSequences(TokenFile(source, "val"), seq_len)
            kind = f"validation split of {source}"
        elif source.is_file():
            data = _TextWindows(
                self.tokenizer.encode(source.read_text(encoding="utf-8", errors="replace")), seq_len
            )
            kind = f"text file {source}"
        else:
            raise ValueError(
                f"no perplexity data {str(source)!r}; pass --data a token folder (with val.json) or a text file"
            )
        picks = val_indices(data, 1, num_windows)[0]  # num_windows windows spread evenly over the data
        batches = [picks[i : i + 8] for i in range(0, len(picks), 8)]
        was_training = model.training
        model.eval()
        try:
            total = lm_loss_sums(model, data, batches, model.device, contextlib.nullcontext)
        finally:
            model.train(was_training)
        loss = float(total[0] / max(float(total[1]), 1.0))
        return {
            "source": kind,
            "tokens": int(total[1]),
            "loss": loss,
            "perplexity": perplexity(loss),
            "seq_len": seq_len,
            "windows": sum(len(b) for b in batches),
        }


class _TextWindows:
    """`PackedSequences`' interface over the tokens of one text (every position is a target)."""

    def __init__(self, ids: list[int], seq_len: int) -> None:
        if len(ids) < seq_len + 1:
            raise ValueError(
                f"the text has {len(ids)} tokens: too few for one window of {seq_len + 1}; "
                "use a longer file or a smaller --seq-len"
            )
        self.ids, self.seq_len = ids, seq_len
        self.num_windows = (len(ids) - 1) // seq_len

    def __len__(self) -> int:
        return self.num_windows

    def batch(self, indices: list[int]) -> Any:

        L = self.seq_len
        rows = torch.tensor([self.ids[i * L : i * L + L + 1] for i in indices])
        return Batch(rows[:, :L].contiguous(), rows[:, 1:].clone())


class OpenAIBackend:
    """Chat completions on an OpenAI-compatible endpoint (the `openai` SDK), `max_concurrency` requests at once."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        model: str | None = None,
        *,
        timeout: float = 120.0,
        max_concurrency: int = 8,
    ) -> None:
        import openai  # lazy: optional dependency

        self.base_url = base_url
        self.client = openai.OpenAI(
            base_url=base_url,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
            timeout=timeout,
            max_retries=1,
        )
        self.max_concurrency = max(1, max_concurrency)
        self.model = model or self._first_model()
        self.name = f"openai:{base_url} ({self.model})"

    def _call(self, fn: Any) -> Any:
        import openai  # lazy: optional dependency

        try:
            return fn()
        except openai.APIConnectionError as e:
            raise ValueError(
                f"cannot reach {self.base_url} ({e}); start the server or fix --base-url"
            ) from None
        except openai.AuthenticationError:
            raise ValueError(
                f"{self.base_url} rejected the API key; pass --api-key or set OPENAI_API_KEY"
            ) from None
        except openai.NotFoundError as e:
            raise ValueError(
                f"{self.base_url}: not found ({e.message}); check --served-model and that --base-url "
                "ends in /v1"
            ) from None
        except openai.APIStatusError as e:
            raise ValueError(f"{self.base_url} answered HTTP {e.status_code}: {e.message}") from None

    def _first_model(self) -> str:
        models = self._call(lambda: list(self.client.models.list()))
        if not models:
            raise ValueError(f"{self.base_url} lists no models; pass --served-model NAME")
        return models[0].id

    def _one(self, request: Request, seed: int | None, options: GenerationOptions) -> Reply:
        messages, tools = request
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": options.max_tokens,
            "temperature": options.temperature,
            "top_p": options.top_p,
        }
        if tools:
            kwargs["tools"] = tools
        if seed is not None:
            kwargs["seed"] = seed
        if not options.thinking:  # vLLM / SGLang / glm5 serve convention
            kwargs["extra_body"] = {"chat_template_kwargs": {"enable_thinking": False}}
        response = self._call(lambda: self.client.chat.completions.create(**kwargs))
        choice = response.choices[0]
        msg = choice.message
        extra = getattr(msg, "model_extra", None) or {}
        reasoning = (
            getattr(msg, "reasoning_content", None)
            or extra.get("reasoning_content")
            or extra.get("reasoning")
        )
        calls = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            }
            for c in (msg.tool_calls or [])
        ]
        return Reply(msg.content or "", reasoning, calls, choice.finish_reason)

    def chat(self, requests: list[Request], n: int, options: GenerationOptions) -> list[list[Reply]]:
        jobs = [(i, j) for i in range(len(requests)) for j in range(n)]
        seeds = [None if options.seed is None else options.seed + j for _, j in jobs]
        with ThreadPoolExecutor(self.max_concurrency) as pool:
            replies = list(pool.map(lambda job, s: self._one(requests[job[0]], s, options), jobs, seeds))
        out: list[list[Reply]] = [[] for _ in requests]
        for (i, _), reply in zip(jobs, replies):
            out[i].append(reply)
        return out


def tool_result(call: dict[str, Any]) -> str:
    """Run one tool call: the calculator of `glm5.data.tasks`; an error text for anything else."""
    fn = call.get("function") or {}
    if fn.get("name") != "calculator":
        return f"error: unknown tool {fn.get('name')!r}"
    args = fn.get("arguments")
    try:
        args = json.loads(args) if isinstance(args, str) else (args or {})
    except json.JSONDecodeError:
        return "error: arguments are not valid JSON"
    expression = args.get("expression") if isinstance(args, dict) else None
    return calculator(str(expression)) if expression is not None else "error: missing argument 'expression'"


__all__ = ["Backend", "GenerationOptions", "LocalBackend", "OpenAIBackend", "Reply", "tool_result"]
