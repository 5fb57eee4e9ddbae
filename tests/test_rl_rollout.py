"""The RolloutManager on the real engine with scripted outputs: a multi-turn calculator episode assembled token
by token (prompt, policy turns, environment observation), its masks, logprobs and reward; aborts in the middle
of an episode; the capped zero-variance filter; reward judges cancelled at abort (docs/rl.md § What the tests prove)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from lifecycle import ManualClock

import glm5.rl.rollout as rollout_module
from glm5 import GLM5Config
from glm5.data.tasks import generate_tasks
from glm5.engine.engine import EngineConfig, LLMEngine
from glm5.model import GLM5ForCausalLM
from glm5.rl.actors import WorkerPool
from glm5.rl.buffer import BufferConfig, DataBuffer
from glm5.rl.controller import LoopBuffer, LoopRollout, LoopTrainer, build_local, run_loop
from glm5.rl.recipes import SMALL_MODEL, build_task, digits_reward, recipe_preset, task_prompts
from glm5.rl.rewards import CalculatorEnvironment, math_reward
from glm5.rl.rollout import RolloutConfig, RolloutManager
from glm5.rl.trainer import RLTrainer
from glm5.rl.types import SampleStatus, new_group
from glm5.tokenizer import GLM5Tokenizer, render_chat

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def episode():
    """A calculator task, a BPE tokenizer trained on such episodes, and the two scripted assistant turns."""
    tasks = generate_tasks({"calculator": 4}, seed=11)
    tok = GLM5Tokenizer.train(
        iter([render_chat(t.messages, t.tools, add_generation_prompt=False) for t in tasks] * 4),
        vocab_size=384,
    )
    task = tasks[0]
    expression, answer = task.meta["expression"], task.answer
    turn1 = tok.encode(
        "Large numbers; I will use the calculator.</think><tool_call>calculator<arg_key>expression"
        f"</arg_key><arg_value>{expression}</arg_value></tool_call><|observation|>",
        allow_special=True,
    )
    reply = f"{expression} = {answer}"
    turn2 = tok.encode(f"The calculator returned {answer}.</think>{reply}<|endoftext|>", allow_special=True)
    special = tok.special_token_ids
    assert special["<think>"] not in turn1 + turn2  # the script position is counted from the last <think>
    return {
        "tok": tok,
        "task": task,
        "prompt": task_prompts([task], tok)[0],
        "turn1": turn1,
        "turn2": turn2,
        "reply": reply,
        "answer": answer,
        "special": special,
    }


def _script(ep: dict):
    """The force_token hook: turn 1 until the policy handed over with <|observation|>, then turn 2. The position
    inside the current turn is counted from the last <think> (the generation prompt of every assistant turn),
    so a resumed (partial) request continues the script where the aborted one stopped."""
    think, observation = ep["special"]["<think>"], ep["special"]["<|observation|>"]
    prompt_len = len(ep["prompt"]["tokens"])

    def force(prompt_ids: list[int], output_ids: list[int]) -> int | None:
        seq = prompt_ids + output_ids
        pos = seq[::-1].index(think)  # tokens after the last <think>
        script = ep["turn2"] if observation in seq[prompt_len:] else ep["turn1"]
        return script[pos] if pos < len(script) else None

    return force


def _manager(ep: dict, *, max_turns: int = 2, reward_fn=math_reward, engine_log: list | None = None, **cfg):
    tok = ep["tok"]
    # index_topk covers the whole episode: DSA is then exactly dense attention. (Below it, this toy's two
    # indexer heads give many tied scores, broken differently by the engine and the trainer's forward.)
    torch.manual_seed(0)
    model_cfg = GLM5Config.from_preset("tiny").replace(
        vocab_size=tok.vocab_size,
        eos_token_id=tok.eos_token_ids,
        pad_token_id=tok.pad_token_id,
        **{**SMALL_MODEL, "index_topk": 512},
    )
    model = GLM5ForCausalLM(model_cfg)
    engine = LLMEngine(
        model, tok, EngineConfig(block_size=16, num_blocks=256, max_num_seqs=8, force_token=_script(ep))
    )
    if engine_log is not None:  # what the engine itself reported, per request
        step = engine.step

        def logged_step():
            outs = step()
            engine_log.extend(outs)
            return outs

        engine.step = logged_step
    buffer = DataBuffer(
        [ep["prompt"]], BufferConfig(batch_size=1, max_concurrent=1, num_epochs=1, shuffle=False)
    )
    cfg = {"n_samples": 1, "max_new_tokens": 128, "filter_zero_variance": False, **cfg}
    env = CalculatorEnvironment(tok, max_turns=max_turns)
    return (
        RolloutManager(engine, buffer, reward_fn, RolloutConfig(**cfg), tokenizer=tok, env=env),
        buffer,
        model,
    )


def _finished_sample(manager, buffer):
    manager.run_until(lambda: buffer.num_ready() >= 1, timeout=60)
    (group,) = buffer.get_batch(1)
    return group[0]


def test_a_calculator_episode_is_prompt_turn_observation_turn_with_masks_logprobs_and_reward(episode):
    ep, tok = episode, episode["tok"]
    log: list = []
    manager, buffer, model = _manager(ep, engine_log=log)
    s = _finished_sample(manager, buffer)
    prompt, turn1, turn2 = ep["prompt"]["tokens"], ep["turn1"], ep["turn2"]
    s.check()
    assert (
        s.status == SampleStatus.COMPLETED
        and s.prompt_len == len(prompt)
        and s.tokens[: len(prompt)] == prompt
    )
    obs = s.tokens[len(prompt) + len(turn1) : len(s.tokens) - len(turn2)]
    assert s.tokens == prompt + turn1 + obs + turn2
    # The observation is the GLM tool-response turn holding the calculator's exact result, then the next
    # assistant prompt (turn 1 ended with the generated <|observation|>, which stays a policy token).
    assert tok.decode(obs) == f"<tool_response>{ep['answer']}</tool_response><|assistant|><think>"
    assert s.loss_mask == [1] * len(turn1) + [0] * len(obs) + [1] * len(turn2)
    assert s.behavior_logprobs[len(turn1) : len(turn1) + len(obs)] == [0.0] * len(obs)
    # Generated tokens carry exactly the logprobs the engine reported for its two requests, in order...
    reported: dict[str, list[float]] = {}
    for out in log:
        c = out.outputs[0]
        reported.setdefault(out.request_id, []).extend(d[t] for d, t in zip(c.logprobs, c.token_ids))
    assert len(reported) == 2
    first, second = reported.values()
    assert s.behavior_logprobs == first + [0.0] * len(obs) + second
    # ...which are the policy's own logprobs of those tokens in context (an independent recompute).
    recomputed = RLTrainer(model).logprobs([s])[0]
    trained = [i for i, m in enumerate(s.loss_mask) if m]
    assert torch.allclose(
        torch.tensor([recomputed[i] for i in trained]),
        torch.tensor([s.behavior_logprobs[i] for i in trained]),
        atol=1e-4,
    )
    assert set(s.token_versions) == {0}
    # The reward is the math reward of the final reply only (reasoning and the tool call stripped).
    assert s.metadata["reply"] == ep["reply"] and s.metadata["turn"] == 1
    assert s.reward == 1.0 == math_reward(ep["reply"], s.metadata)


def test_a_spent_tool_budget_ends_the_episode_after_the_tool_call(episode):
    manager, buffer, _ = _manager(episode, max_turns=0)
    s = _finished_sample(manager, buffer)
    assert s.tokens == episode["prompt"]["tokens"] + episode["turn1"] and s.loss_mask == [1] * len(
        episode["turn1"]
    )
    assert s.metadata["reply"] == "" and s.reward == 0.0  # a tool-call turn has no content: nothing answered


def _step_until(manager, condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the scripted episode did not get there in time"
        manager.step()
        time.sleep(0.001)


@pytest.mark.parametrize("partial", [True, False])
def test_an_episode_aborted_mid_turn_resumes_or_restarts_to_the_same_tokens(episode, partial, monkeypatch):
    """Partial rollouts: aborted inside the tool call of turn 1, the continuation still gets the observation
    (the environment reads the whole turn, not just the resumed request). Restart: aborted in turn 2, the
    episode starts over with its whole tool budget. Tokens trickle out at 10 ms each on a manual clock
    (tests/lifecycle.py), so the abort lands exactly where the test puts it."""
    ep = episode
    reference = _finished_sample(*_manager(ep, max_turns=1)[:2])
    manager, buffer, _ = _manager(ep, max_turns=1, partial_rollout=partial)
    clock, delay = ManualClock(), 0.01
    monkeypatch.setattr(rollout_module, "time", clock)
    manager.delay_fn = lambda sample: delay
    turn1 = ep["turn1"]
    cut = turn1.index(ep["special"]["<tool_call>"]) + 3  # inside the tool call

    def request():
        (req,) = manager.requests.values()
        return req

    def generate(n: int) -> None:
        """Step until the request in flight has generated n tokens (none of them visible yet)."""
        _step_until(manager, lambda: len(manager.requests) == 1 and len(request().ids) >= n)

    generate(len(turn1))  # turn 1 generated, still invisible
    if partial:
        clock.advance(cut * delay + delay / 2)  # `cut` tokens of turn 1 shown
        expected = cut
    else:
        clock.advance(len(turn1) * delay + delay / 2)  # turn 1 shown: the observation starts turn 2
        manager.step()
        assert request().sample.metadata.get("turn") == 1
        generate(3)
        clock.advance(2 * delay + delay / 2)  # two tokens of turn 2 shown
        expected = None
    assert manager.abort_all() == 1
    (_, _, group) = buffer.queue[0]
    if partial:
        (aborted,) = group
        assert aborted.status == SampleStatus.ABORTED and aborted.response_len == expected
        assert aborted.tokens[len(ep["prompt"]["tokens"]) :] == turn1[:cut]
    else:
        assert group is None
    manager.delay_fn = None
    s = _finished_sample(manager, buffer)
    assert s.tokens == reference.tokens and s.loss_mask == reference.loss_mask
    assert s.reward == 1.0 and s.metadata["reply"] == ep["reply"]


def _constant_reward_system(cap: int | None):
    """digits-sync with a judge that gives every rollout the same reward: every group has zero variance."""
    base = recipe_preset("digits-sync")
    recipe = base.replace(
        steps=2,
        buffer={**base.buffer, "batch_size": 4},
        rollout={**base.rollout, "max_filtered_per_step": cap},
    )
    task = build_task(recipe, None, log=lambda *_: None)
    task["reward_fn"] = lambda reply, metadata: 0.0
    return recipe, build_local(recipe, task)


def test_the_loop_collaborators_satisfy_the_loop_protocols():
    """run_loop's parameters are typed with LoopBuffer / LoopRollout / LoopTrainer: the in-process classes and
    the Ray worker pool provide every method the loop calls (the Ray buffer/trainer proxies forward any name)."""
    assert issubclass(DataBuffer, LoopBuffer)
    assert issubclass(RolloutManager, LoopRollout) and issubclass(WorkerPool, LoopRollout)
    assert issubclass(RLTrainer, LoopTrainer)
    assert not issubclass(DataBuffer, LoopRollout) and not issubclass(RLTrainer, LoopBuffer)


def test_the_zero_variance_filter_drops_at_most_the_cap_per_step_then_keeps_groups_with_zero_advantage():
    recipe, system = _constant_reward_system(cap=3)
    buffer, rollout, trainer = system["buffer"], system["rollout"], system["trainer"]
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    records = run_loop(
        buffer, rollout, trainer, system["transport"], steps=recipe.steps, overlap=False, max_wait_s=60
    )
    assert len(records) == 2  # the trainer was not starved
    assert buffer.counts()["filtered"] == 3 * 2  # the cap at each of the two weight versions
    assert records[-1]["rollout_zero_variance_kept"] == 2 * recipe.configs()[0].batch_size
    assert records[-1]["rollout_filtered"] == 6
    for rec in records:
        assert rec["reward"] == 0.0 and rec["grad_norm"] == 0.0  # kept groups carry no policy gradient
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_without_a_cap_a_deterministic_judge_starves_the_trainer():
    recipe, system = _constant_reward_system(cap=None)
    with pytest.raises(TimeoutError):
        run_loop(
            system["buffer"],
            system["rollout"],
            system["trainer"],
            system["transport"],
            steps=1,
            overlap=False,
            max_wait_s=0.5,
        )
    assert system["buffer"].counts()["filtered"] > 3 and system["buffer"].counts()["trained"] == 0


def test_abort_cancels_slow_reward_judges_and_the_groups_are_judged_again_without_regenerating():
    """A judge that hangs does not hold up generation or an abort (slime #2176): at abort, pending scoring is
    cancelled and the finished groups go back to the buffer with their samples; a verdict the abandoned judge
    delivers later is ignored."""
    aborted, gate, returned = threading.Event(), threading.Event(), threading.Event()

    def judge(reply: str, metadata: dict) -> float:
        if not aborted.is_set():
            gate.wait(30)  # slow: until after the abort
            returned.set()
            return 123.0  # a stale verdict nobody may use
        return digits_reward(reply, metadata)

    base = recipe_preset("digits-sync")
    recipe = base.replace(
        steps=1,
        rollout={**base.rollout, "reward_workers": 1, "partial_rollout": True, "filter_zero_variance": False},
    )
    task = build_task(recipe, None, log=lambda *_: None)
    task["reward_fn"] = judge
    system = build_local(recipe, task)
    rollout, buffer = system["rollout"], system["buffer"]
    num_groups = buffer.batch_size()
    # generation went on
    _step_until(rollout, lambda: not rollout.groups and len(rollout.scoring) == num_groups)
    generated = {s.uid: list(s.tokens) for _, _, group, _ in rollout.scoring.values() for s in group}
    assert rollout.abort_all() == num_groups
    assert not returned.is_set()  # the abort did not wait for the judge (it is still blocked on the gate)
    assert rollout.stats["scoring_cancelled"] == num_groups and not rollout.scoring
    assert all(
        group is not None and all(s.done and s.reward is None for s in group) for _, _, group in buffer.queue
    )
    aborted.set()
    gate.set()  # the abandoned judge now returns its stale verdict
    rollout.run_until(lambda: buffer.num_ready() >= num_groups, timeout=30)
    assert returned.wait(30)  # the abandoned judge has delivered its stale verdict...
    rollout.step()  # ...and a scheduling round has run since
    samples = [s for group in buffer.get_batch(num_groups) for s in group]
    assert {s.uid: s.tokens for s in samples} == generated  # judged again, not generated again
    assert all(s.reward == digits_reward(s.metadata["reply"], s.metadata) for s in samples)
    assert buffer.counts()["late_results"] == 0 and rollout.stats["groups"] == num_groups


def test_restarting_a_sample_from_scratch_restores_its_whole_tool_budget():
    (s,) = new_group(0, 0, [1, 2], 1, {"answer": "3"})
    s.append([5, 6], [-0.1, -0.2], [0, 0], trainable=True)
    s.append([7], [0.0], [0], trainable=False)
    s.metadata.update(turn=1, reply="x")
    s.reward = 1.0
    s.reset_response()
    assert s.tokens == [1, 2] and s.loss_mask == s.behavior_logprobs == s.token_versions == []
    assert s.reward is None and s.metadata == {"answer": "3"}  # a stale turn count would shrink the budget
