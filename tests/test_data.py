"""Pre-training data: synthetic chat tasks, token files, the deterministic split, packing and the batch cursor."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from glm5.data import (
    ABSTENTION,
    IGNORE,
    BatchOrder,
    DataSpec,
    PackedSequences,
    TokenFile,
    build_dataset,
    calculator,
    check_answer,
    corpus_texts,
    generate_tasks,
    is_abstention,
)
from glm5.data.tasks import evaluate_expression
from glm5.tokenizer import GLM5Tokenizer

COUNTS = {"arithmetic": 12, "word_problem": 4, "calculator": 6, "unanswerable": 6}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(30):
        body = "\n".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}  # line {j}" for j in range(20))
        (folder / f"mod{i:02d}.py").write_text(f'"""Module {i}."""\n{body}\n')
    return folder


@pytest.fixture(scope="module")
def spec(corpus_dir) -> DataSpec:
    return DataSpec(corpus=[str(corpus_dir)], chat_tasks=COUNTS, val_fraction=0.2, seed=3)


@pytest.fixture(scope="module")
def tok(spec) -> GLM5Tokenizer:
    return GLM5Tokenizer.train(corpus_texts(spec), vocab_size=400)


def test_task_generators_are_deterministic_and_reference_answers_check_out():
    a, b = generate_tasks(COUNTS, seed=1), generate_tasks(COUNTS, seed=1)
    assert [t.messages for t in a] == [t.messages for t in b]
    assert [t.messages for t in generate_tasks(COUNTS, seed=2)] != [t.messages for t in a]
    assert sorted({t.kind for t in a}) == sorted(COUNTS)
    assert sum(t.kind == "calculator" for t in a) == COUNTS["calculator"]
    for task in a:
        final = task.messages[-1]
        # short thinking before every answer
        assert final["role"] == "assistant" and final["reasoning_content"]
        assert check_answer(task, final["content"]), (task.kind, final)
        assert task.prompt_messages[-1]["role"] == "user"
        if task.kind == "unanswerable":
            assert task.answer is None and final["content"] == ABSTENTION


def test_arithmetic_thinking_is_the_step_by_step_evaluation():
    for task in generate_tasks({"arithmetic": 30}, seed=5):
        expression = task.meta["expression"]
        expected = eval(expression)  # reasoning-gym expressions: numbers, + - * / and parentheses only
        assert float(Fraction(task.answer)) == pytest.approx(expected, rel=1e-6, abs=1e-6)
        steps = task.messages[-1]["reasoning_content"]
        if any(op in expression.strip().lstrip("-") for op in "+-*/"):
            assert steps.rstrip(".").split("= ")[-1] == task.answer  # the last step gives the answer


def test_calculator_tool_is_exact_and_refuses_code():
    assert calculator("(12 + 7) * 3") == "57"
    assert calculator("2 / 3 * 3") == "2"
    assert calculator("1 / 4") == "0.25"
    assert calculator("__import__('os').system('true')").startswith("error")
    assert calculator("1 / 0").startswith("error")
    steps: list[str] = []
    assert evaluate_expression("2 + 3 * 4", steps) == 14 and steps == ["3 * 4 = 12", "2 + 12 = 14"]


def test_check_answer_rewards_right_numbers_and_abstention_only_where_due():
    tasks = generate_tasks({"arithmetic": 1, "unanswerable": 1}, seed=0)
    arith = next(t for t in tasks if t.kind == "arithmetic")
    unknown = next(t for t in tasks if t.kind == "unanswerable")
    assert check_answer(arith, f"The result is {arith.answer}")
    assert not check_answer(arith, f"The result is {int(Fraction(arith.answer)) + 1}")
    assert not check_answer(arith, "I don't know.")
    assert check_answer(unknown, "I do not know.") and not check_answer(unknown, "It is 42.")
    assert is_abstention("Honestly, I don’t know") and not is_abstention("I know: 4")


def test_chat_loss_mask_covers_what_the_assistant_generates(tok):
    task = next(t for t in generate_tasks({"calculator": 3}, seed=0))
    ids, mask = tok.apply_chat_template(task.messages, task.tools, add_generation_prompt=False)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    untrained = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "<tool_call>calculator" in trained and task.messages[-1]["content"] in trained
    assert task.messages[0]["content"] in untrained  # the question
    # the tool's result is read, not learned
    assert f"<tool_response>{task.answer}</tool_response>" in untrained
    assert ids[-1] == tok.eos_token_id and mask[-1] == 1  # the model learns to stop


def test_token_file_round_trips_through_the_memory_map(tmp_path):
    docs = [(np.array([5, 6, 7]), np.array([1, 0, 1])), (np.array([70_000, 2]), np.array([1, 1]))]
    tf = TokenFile.write(tmp_path, "train", docs, vocab_size=80_000)
    again = TokenFile(tmp_path, "train")
    assert isinstance(again.ids, np.memmap) and again.ids.dtype == np.uint32
    assert again.ids.tolist() == [5, 6, 7, 70_000, 2] and again.mask.tolist() == [1, 0, 1, 1, 1]
    assert again.meta["doc_offsets"] == [0, 3, 5] and tf.num_documents == 2
    assert TokenFile.write(tmp_path, "small", docs[:1], vocab_size=100).ids.dtype == np.uint16
    assert not list(tmp_path.glob(".*.tmp"))  # temp files were renamed into place


def test_dataset_split_is_deterministic_disjoint_and_cached(tmp_path, tok, spec):
    train, val = build_dataset(tmp_path / "a", tok, spec)
    train2, val2 = build_dataset(tmp_path / "b", tok, spec)
    assert (tmp_path / "a/train.ids").read_bytes() == (tmp_path / "b/train.ids").read_bytes()
    assert np.array_equal(val.ids, val2.ids) and np.array_equal(train.mask, train2.mask)
    assert 0 < len(val) < len(train)

    def docs(tf: TokenFile) -> set[bytes]:
        offs = tf.meta["doc_offsets"]
        return {np.asarray(tf.ids[a:b]).tobytes() for a, b in zip(offs, offs[1:])}

    assert not docs(train) & docs(val)  # no document is in both splits
    assert train.mask.min() == 0 and train.mask.max() == 1  # chat prompts are masked, code is not
    stamp = (tmp_path / "a/train.ids").stat().st_mtime_ns
    build_dataset(tmp_path / "a", tok, spec)
    assert (tmp_path / "a/train.ids").stat().st_mtime_ns == stamp  # same spec + tokenizer: reused
    build_dataset(tmp_path / "a", tok, DataSpec(**{**spec.__dict__, "seed": 4}))
    assert (tmp_path / "a/train.ids").stat().st_mtime_ns != stamp  # another spec: rebuilt


def test_packed_windows_shift_targets_and_keep_the_loss_mask(tmp_path):
    ids = np.arange(1, 24)
    mask = (ids % 4 != 0).astype(np.uint8)
    data = PackedSequences(TokenFile.write(tmp_path, "train", [(ids, mask)], vocab_size=100), seq_len=5)
    assert len(data) == (23 - 1) // 5
    batch = data.batch([0, 2])
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [11, 12, 13, 14, 15]]
    assert batch.targets.tolist() == [[2, 3, IGNORE, 5, 6], [IGNORE, 13, 14, 15, IGNORE]]
    assert batch.mtp_targets(0).tolist() == [[3, IGNORE, 5, 6, IGNORE], [13, 14, 15, IGNORE, IGNORE]]
    halves = batch.split(2)
    assert torch.equal(halves[1].input_ids, batch.input_ids[1:])
    with pytest.raises(IndexError):
        data.batch([len(data)])


def test_batch_order_is_a_seeded_permutation_that_resumes_exactly():
    order = BatchOrder(num_windows=10, batch_size=3, seed=7)
    seen = [order.next_indices().tolist() for _ in range(3)]
    assert len({i for b in seen for i in b}) == 9  # one epoch: no window twice
    saved = order.state_dict()
    rest = [order.next_indices().tolist() for _ in range(4)]
    resumed = BatchOrder(num_windows=10, batch_size=3, seed=7)
    resumed.load_state_dict(saved)
    assert [resumed.next_indices().tolist() for _ in range(4)] == rest
    assert order.epoch == 2 and rest[0] != seen[0]  # a new permutation each epoch
    assert [BatchOrder(10, 3, seed=7).next_indices().tolist() for _ in range(2)] == [seen[0]] * 2
