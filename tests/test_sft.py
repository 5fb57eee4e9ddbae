"""SFT (glm5/train/sft.py): assistant-only loss masks (tool observations never carry loss), whole conversations
per window, bit-exact resume, the `glm5 sft` command and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from glm5.cli import main as cli_main
from glm5.data.frontier import frontier_tasks
from glm5.data.packing import IGNORE
from glm5.model import GLM5ForCausalLM
from glm5.train import Trainer, recipe_preset
from glm5.train.sft import SFTRecipe, SFTTrainer, build_sft_data, load_sft_recipe, pack_whole, sft_preset

STEPS = 4


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 2-step smoke pre-training run: the --init of every SFT here."""
    out = tmp_path_factory.mktemp("sft_init") / "pre"
    Trainer(recipe_preset("smoke").replace(steps=2, eval_tasks={}), out, quiet=True).run()
    return out


def _recipe(**changes) -> SFTRecipe:
    return sft_preset("smoke").replace(**{"steps": STEPS, "heldout_eval": 0, **changes})


def _assistant_spans(tok, ids: list[int]) -> np.ndarray:
    """1 where a token is written by the assistant: after <|assistant|> up to and including the token that ends
    its turn (<|user|>, <|observation|> or <|endoftext|>), by scanning the role markers."""
    special = {
        tok.token_to_id(t): t for t in ("<|assistant|>", "<|user|>", "<|observation|>", "<|endoftext|>")
    }
    special.update({tok.token_to_id(t): t for t in ("<|system|>", "[gMASK]", "<sop>")})
    out = np.zeros(len(ids), np.uint8)
    inside = False
    for i, t in enumerate(ids):
        name = special.get(t)
        if inside:
            out[i] = 1
            if name in ("<|user|>", "<|observation|>", "<|endoftext|>"):
                inside = False
        elif name == "<|assistant|>":
            inside = True
    return out


def _check_mask(tok, ids: list[int], mask) -> None:
    """Loss only inside assistant turns, and all of each turn except a `<think>` the template opens for it
    after a tool result (part of the prompt there)."""
    mask, spans = np.asarray(mask, bool), _assistant_spans(tok, ids).astype(bool)
    assert not (mask & ~spans).any()
    think = tok.token_to_id("<think>")
    missing = np.flatnonzero(spans & ~mask)
    assert all(ids[i] == think and ids[i - 1] == tok.token_to_id("<|assistant|>") for i in missing)


def test_sft_loss_mask_is_the_assistant_turns_only(pretrained, tmp_path):
    trainer = SFTTrainer(_recipe(text_share=0.0), tmp_path / "sft", init=pretrained, quiet=True)
    tok = trainer.tok
    # one tool episode: the mask is exactly the assistant's tokens; the observation turn carries none
    task = frontier_tasks("tool", 1, 0)[0]
    ids, mask = tok.apply_chat_template(task.messages, task.tools, add_generation_prompt=False)
    _check_mask(tok, ids, mask)
    obs = ids.index(tok.token_to_id("<|observation|>"))
    nxt = ids.index(tok.token_to_id("<|assistant|>"), obs)
    assert mask[obs] == 1 and not any(mask[obs + 1 : nxt + 1])  # the stop token is learned, the result is not
    result = tok.decode(ids[obs + 1 : nxt])
    assert task.messages[2]["content"] in result and "<tool_response>" in result
    # the whole training file (chats only here): every token with loss is an assistant token
    data = trainer.train_file
    ids_all, mask_all = np.asarray(data.ids, np.int64), np.asarray(data.mask)
    chat_tokens = json.loads((tmp_path / "sft" / "data" / "train.json").read_text())["sft"]["chat_tokens"]
    assert 0 < mask_all.sum() < len(ids_all)
    bos = tok.token_to_id("[gMASK]")
    starts = np.flatnonzero(ids_all == bos)
    covered = masked = 0
    for a, b in zip(starts, [*starts[1:], len(ids_all)]):
        seg_ids, seg_mask = ids_all[a:b].tolist(), mask_all[a:b]
        end = seg_ids.index(tok.eos_token_id) + 1 if tok.eos_token_id in seg_ids else len(seg_ids)
        _check_mask(tok, seg_ids[:end], seg_mask[:end])
        covered += end
        masked += int(seg_mask[:end].sum())
    assert covered == chat_tokens  # every conversation was checked; the rest is padding without loss
    assert masked == mask_all.sum()  # the padding between conversations carries none
    # and the batches the shared training step sees ignore everything else
    batch = trainer.train_data.batch(list(range(len(trainer.train_data))))
    flat = np.asarray(data.ids[1 : 1 + batch.targets.numel()], np.int64)
    learned = (batch.targets != IGNORE).flatten().numpy()
    assert np.array_equal(learned, np.asarray(data.mask[1 : 1 + batch.targets.numel()]) == 1)
    assert np.array_equal(batch.targets.flatten().numpy()[learned], flat[learned])


def test_pack_whole_keeps_each_conversation_in_one_window():
    docs = [(np.arange(n) + 10 * n, np.ones(n, np.uint8)) for n in (5, 3, 4, 6, 2)]
    ids, mask = pack_whole(docs, 8, pad_id=0)
    assert len(ids) % 8 == 0 and len(ids) == len(mask)
    windows = [ids[i : i + 8].tolist() for i in range(0, len(ids), 8)]
    for doc, _ in docs:
        assert any(doc.tolist() == w[j : j + len(doc)] for w in windows for j in range(8)), doc
    assert mask.sum() == sum(len(d) for d, _ in docs)  # padding carries no loss
    long_ids, long_mask = pack_whole([(np.arange(1, 20), np.ones(19, np.uint8))], 8, pad_id=0)
    assert long_ids[:19].tolist() == list(range(1, 20)) and long_mask.sum() == 19  # text is cut, not dropped


def test_conversations_longer_than_the_window_are_counted_and_reported(pretrained, tmp_path, capsys):
    """A conversation longer than the SFT window is cut: its reply trains without its prompt (the demo's tool
    episodes did at 256 tokens, and no tool call came out well-formed). build_sft_data says so and counts them."""
    from glm5.tokenizer import GLM5Tokenizer

    tok = GLM5Tokenizer.from_pretrained(pretrained / "model")
    tasks = {"frontier_easy": 3, "frontier_tool": 2}
    tool = frontier_tasks("tool", 2, 0)
    lengths = [
        len(tok.apply_chat_template(t.messages, t.tools, add_generation_prompt=False)[0]) for t in tool
    ]
    # tool episodes differ by a few tokens (the product's digits appear three times): 10 clear of all of them
    for seq_len, cut in ((max(lengths) + 10, 0), (min(lengths) - 10, 2)):
        recipe = _recipe(tasks=tasks, text_share=0.0, seq_len=seq_len)
        build_sft_data(tmp_path / str(seq_len), tok, recipe, None)
        info = json.loads((tmp_path / str(seq_len) / "train.json").read_text())
        assert info["sft"]["cut_chats"] == cut
        assert ("2 of 5 conversations are longer than seq_len" in capsys.readouterr().out) == bool(cut)


def test_sft_resume_is_bit_exact(pretrained, tmp_path):
    straight = SFTTrainer(_recipe(), tmp_path / "a", init=pretrained, quiet=True)
    records_a = straight.fit()
    interrupted = SFTTrainer(_recipe(), tmp_path / "b", init=pretrained, quiet=True)
    first = [interrupted.train_step() for _ in range(2)]
    interrupted.save()
    del interrupted  # a crash after the checkpoint of step 2
    resumed = SFTTrainer(_recipe(), tmp_path / "b", init=pretrained, quiet=True)
    records_b = resumed.fit()
    assert resumed.step == straight.step == STEPS
    meta = json.loads((tmp_path / "a" / "data" / "train.json").read_text())["sft"]
    assert meta["text_windows"] > 0 and meta["chats"] == sum(_recipe().tasks.values())  # the mixture
    losses = lambda rs: [(r["loss"], r["lm"], r["grad_norm"]) for r in rs]  # noqa: E731
    assert losses(first + records_b) == losses(records_a)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the SFT changed the pre-trained weights and started from them
    init = GLM5ForCausalLM.from_pretrained(str(pretrained / "model")).state_dict()
    assert any(not torch.equal(init[k], a[k]) for k in a)


def test_sft_recipe_must_match_on_resume_and_validates(pretrained, tmp_path):
    SFTTrainer(_recipe(steps=1), tmp_path / "r", init=pretrained, quiet=True).fit()
    with pytest.raises(ValueError, match="different recipe"):
        SFTTrainer(_recipe(steps=2, text_share=0.0), tmp_path / "r", init=pretrained, quiet=True).fit()
    with pytest.raises(ValueError, match="text_share must be in"):
        _recipe(text_share=1.5)
    with pytest.raises(ValueError, match="not an SFT preset"):
        load_sft_recipe("nonsense")
    (tmp_path / "bad.toml").write_text('preset = "smoke"\nlearning_rate = 1\n')
    with pytest.raises(ValueError, match="unknown field 'learning_rate'"):
        load_sft_recipe(str(tmp_path / "bad.toml"))
    (tmp_path / "ok.toml").write_text('preset = "smoke"\nsteps = 3\ntext_share = 0.0\n')
    assert load_sft_recipe(str(tmp_path / "ok.toml")).steps == 3


@pytest.mark.slow
def test_glm5_sft_command_trains_exports_and_scores_held_out_items(pretrained, tmp_path, capsys):
    out = tmp_path / "sft"
    argv = ["sft", "--init", str(pretrained), "--data", "smoke", "--steps", "2", "--out", str(out), "--quiet"]
    assert cli_main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 2 and summary["init"] == str(pretrained)
    held = summary["heldout"]
    assert set(held["per_difficulty"]) == {"easy", "hard", "unanswerable", "tool"}
    for key in ("accuracy", "abstention_rate", "tool_call_valid"):
        assert 0.0 <= held[key] <= 1.0
    for name in (
        "loss.png",
        "metrics.jsonl",
        "model/config.json",
        "model/tokenizer.json",
        "eval-heldout/results.json",
    ):
        assert (out / name).is_file(), name
    GLM5ForCausalLM.from_pretrained(str(out / "model"))
    assert "held-out frontier items" in capsys.readouterr().out
    bad = tmp_path / "missing-init"
    bad.mkdir()
    assert cli_main(["sft", "--init", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "expected a `glm5 train`" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
