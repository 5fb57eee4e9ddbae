"""What users touch: text prompts and stop strings, checkpoint folders (BF16 and kept FP8), the async engine, and the
`glm5 generate` / `glm5 chat` commands."""

from __future__ import annotations

import asyncio
import io
import sys
import time
from pathlib import Path

import pytest
import torch
from configs import FRONTEND, random_model, stdlib_tokenizer
from lifecycle import HoldAfter

from glm5 import GLM5ForCausalLM
from glm5.cli import main
from glm5.engine import LLM, AsyncLLMEngine, SamplingParams
from glm5.model.fp8 import weight_bytes
from glm5.tokenizer import GLM5Tokenizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are op-dispatch bound: one thread is faster, and immune to a busy machine (two OpenMP
    threads sharing a loaded core run these tests many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VOCAB = FRONTEND.vocab_size
CFG = FRONTEND


@pytest.fixture(scope="module")
def tok() -> GLM5Tokenizer:
    return stdlib_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def model(tok) -> GLM5ForCausalLM:
    return random_model(CFG, tok)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model, tok) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(str(folder))
    tok.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------- text
def test_text_prompts_stop_strings_and_streamed_text(model, tok) -> None:
    llm = LLM(model, tok, block_size=4)
    prompt = "def main():\n    return"
    free = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0].outputs[0]
    assert free.text == tok.decode(free.token_ids, skip_special_tokens=True)
    stop = free.text[6:9]
    cut = free.text.index(stop)
    out = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop]))[
        0
    ].outputs[0]
    assert out.text == free.text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate(
        prompt,
        SamplingParams(
            max_tokens=24, temperature=0.0, ignore_eos=True, stop=stop, include_stop_str_in_output=True
        ),
    )[0].outputs[0]
    assert kept.text == free.text[: cut + len(stop)]
    # streamed deltas add up to the final text, never showing a stop string that will be cut
    eng = llm.engine
    eng.add_request("s", prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop]))
    pieces = []
    while eng.has_unfinished_requests():
        pieces += [o.outputs[0].text for o in eng.step()]
    assert "".join(pieces) == out.text


def test_eos_ids_default_to_the_tokenizers(model, tok) -> None:
    llm = LLM(model, tok, block_size=4)
    assert sorted(llm.engine.eos_ids) == sorted(tok.eos_token_ids)


def test_checkpoint_folder_loads_with_its_tokenizer_and_matches_the_in_memory_model(
    checkpoint, model, tok
) -> None:
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    from_disk = LLM(str(checkpoint), block_size=4)
    assert from_disk.tokenizer is not None
    assert (
        from_disk.generate(["x = 1"], params)[0].outputs[0].token_ids
        == LLM(model, tok, block_size=4).generate(["x = 1"], params)[0].outputs[0].token_ids
    )


def test_fp8_checkpoint_is_served_with_about_half_the_weight_memory(tmp_path, model) -> None:
    bf16 = GLM5ForCausalLM(CFG).to(torch.bfloat16)
    bf16.load_state_dict(model.state_dict())
    bf16.save_pretrained(str(tmp_path), fp8=True)
    kept = LLM(str(tmp_path), fp8="keep", dtype=torch.bfloat16, block_size=4)
    dequantized = LLM(str(tmp_path), fp8="dequantize", dtype=torch.bfloat16, block_size=4)
    # e4m3 + block scales where the published split quantises; the embedding and LM head stay BF16 and weigh
    # a lot in a model this small, so the saving is below the ~half it is at GLM-5 scale
    assert weight_bytes(kept.model) < 0.8 * weight_bytes(dequantized.model)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    a = kept.generate([[5, 6, 7, 8]], params)[0].outputs[0].token_ids
    b = dequantized.generate([[5, 6, 7, 8]], params)[0].outputs[0].token_ids
    assert a == b  # the kept FP8 weights dequantise to exactly the dequantized model's


# ------------------------------------------------------------------------------------- async
def test_async_streams_concurrent_requests_as_deltas_equal_to_offline_results(model) -> None:
    prompts = [[5, 6, 7], list(range(10, 40)), [9] * 12]
    params = SamplingParams(max_tokens=9, temperature=0.9, seed=3, ignore_eos=True, logprobs=1)
    offline = LLM(model, block_size=4).generate(prompts, params)

    async def run() -> list[list[int]]:
        engine = AsyncLLMEngine.from_model(model, block_size=4)

        async def one(p: list[int]) -> list[int]:
            got, finished = [], 0
            async for delta in engine.generate(p, params):
                got += delta.outputs[0].token_ids
                finished += delta.finished
            assert finished == 1 and delta.outputs[0].finish_reason == "length"
            return got

        out = await asyncio.gather(*(one(p) for p in prompts))
        await engine.shutdown()
        return out

    assert asyncio.run(run()) == [o.outputs[0].token_ids for o in offline]


async def _until(condition, timeout: float = 30.0, what: str = "the condition") -> None:
    """Yield to the event loop until `condition()` holds (an abort being applied); the timeout only bounds a
    failing test."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("how", ["aclose", "break"])
def test_async_consumer_that_stops_listening_aborts_its_request(model, how) -> None:
    """The request is held after 3 of its 200 tokens (tests/lifecycle.py), so it cannot finish by itself: only
    the abort that closing its stream sends can end it. `aclose()` closes at once; a consumer that breaks out
    and drops the stream closes it through the event loop's async-generator finalizer."""
    prompt, max_tokens, held_at = [5, 6, 7, 8, 9], 200, 3

    async def run() -> tuple[int, int, int, int, dict]:
        hold = HoldAfter(held_at)
        engine = AsyncLLMEngine.from_model(model, block_size=4, force_token=hold)
        hold.attach(engine.engine)
        stream = engine.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        got = 0
        if how == "aclose":
            while got < held_at:
                got += len((await stream.__anext__()).outputs[0].token_ids)
            assert engine.engine.has_unfinished_requests() and engine.engine.paused
            await stream.aclose()
        else:
            async for delta in stream:
                got += len(delta.outputs[0].token_ids)
                if got == held_at:
                    break  # the client went away
            assert engine.engine.has_unfinished_requests() and engine.engine.paused
            del stream, delta
        await _until(lambda: not engine.engine.has_unfinished_requests(), what="the abort")
        stats, produced = engine.stats(), hold.produced[tuple(prompt)]
        used = engine.engine.cache.num_used_blocks
        hold.armed = False
        await engine.resume()
        version = await engine.update_weights({}, version=3)  # the engine still works after the abort
        after = [d async for d in engine.generate(prompt, SamplingParams(max_tokens=4, ignore_eos=True))]
        await engine.shutdown()
        assert sum(len(d.outputs[0].token_ids) for d in after) == 4 and after[-1].outputs[
            0
        ].weight_versions == [3]
        return got, produced, used, version, stats

    got, produced, used, version, stats = asyncio.run(run())
    assert got == produced == held_at < max_tokens  # ended by the abort, not by its budget
    assert used == 0 and version == 3
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0


# ------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("flags", [["--speculative-tokens", "1"], ["--decode-steps", "3"]])
def test_cli_generate_streams_text_from_a_checkpoint(checkpoint, capsys, flags) -> None:
    args = [
        "generate",
        "--model",
        str(checkpoint),
        "--prompt",
        "import os",
        "--max-tokens",
        "5",
        "--ignore-eos",
    ]
    code = main([*args, *flags, "--temperature", "0"])
    captured = capsys.readouterr()
    # the streamed text is the engine's own greedy completion (speculative decoding and several decode steps
    # per engine step keep greedy outputs)
    want = (
        LLM(str(checkpoint))
        .generate(
            "import os",
            SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, skip_special_tokens=False),
        )[0]
        .outputs[0]
    )
    assert code == 0 and captured.out == want.text + "\n" and len(want.token_ids) == 5
    assert "5 tokens" in captured.err and "finish: length" in captured.err


def test_cli_generate_with_token_ids_on_a_preset(capsys) -> None:
    assert (
        main(["generate", "--preset", "tiny", "--prompt-ids", "1,2,3", "--max-tokens", "4", "--ignore-eos"])
        == 0
    )
    ids = capsys.readouterr().out.split()
    assert len(ids) == 4 and all(i.isdigit() for i in ids)
    assert main(["generate", "--preset", "tiny", "--prompt", "hi"]) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_cli_chat_keeps_history_toggles_thinking_and_survives_ctrl_c(checkpoint, monkeypatch, capsys) -> None:
    from glm5.engine import engine as engine_module

    calls = {"n": 0}
    step = engine_module.LLMEngine.step

    def flaky_step(self):
        calls["n"] += 1
        if calls["n"] == 2:  # Ctrl-C in the middle of the first reply
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(engine_module.LLMEngine, "step", flaky_step)
    monkeypatch.setattr(
        sys, "stdin", io.StringIO("hello\nhello again\n/think off\nand now?\n/reset\n/exit\n")
    )
    assert main(["chat", "--model", str(checkpoint), "--max-tokens", "6", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "[interrupted]" in out and "thinking off" in out and "history cleared" in out
    assert out.count("you> ") == 6
