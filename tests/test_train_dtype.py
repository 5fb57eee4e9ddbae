"""The training dtype: the probe's decision (injected timings, never real ones), the overrides, bf16 autocast
really active in the training step, fp32 master weights and optimiser state, and an exact bf16 resume."""

from __future__ import annotations

import pytest
import torch
from trainutil import losses, prepare, run_folder, smoke_recipe

import glm5.device as device
from glm5.cli import build_parser
from glm5.device import BF16_MIN_SPEEDUP, choose_train_dtype, train_dtype
from glm5.train import Trainer
from glm5.train.cli import load_recipe

FAST_BF16 = (0.010, 0.004)  # (fp32 s, bf16 s): an AVX512-BF16 CPU
SLOW_BF16 = (0.010, 1.0)  # an AVX2 CPU: no bf16 kernels


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("dtype_base"))


@pytest.fixture
def probe(monkeypatch):
    """Set the probe's (fp32 s, bf16 s) for "auto" (tests/conftest.py pins fp32 through the variable)."""
    monkeypatch.delenv(device.TRAIN_DTYPE_ENV, raising=False)

    def set_timings(timings: tuple[float, float]) -> None:
        monkeypatch.setattr(device, "bf16_probe", lambda _device="cpu": timings)

    return set_timings


def test_the_probe_picks_bf16_only_where_it_is_faster_enough():
    assert choose_train_dtype("cpu", True, FAST_BF16)[0] == torch.bfloat16
    assert choose_train_dtype("cpu", True, SLOW_BF16)[0] == torch.float32
    at, below = (1.0, 1.0 / BF16_MIN_SPEEDUP), (1.0, 1.01 / BF16_MIN_SPEEDUP)
    assert choose_train_dtype("cpu", True, at)[0] == torch.bfloat16
    assert choose_train_dtype("cpu", True, below)[0] == torch.float32  # a small gain does not pay the casts
    dtype, reason = choose_train_dtype("cpu", True, FAST_BF16)
    assert "2.5x faster" in reason
    # accelerators: bf16 where supported, without timing anything; fp32 where not (no fp16 loss scaling here)
    assert choose_train_dtype("cuda", True, None) == (torch.bfloat16, "cuda supports bfloat16")
    assert choose_train_dtype("cuda", False, None)[0] == torch.float32


def test_auto_follows_the_probe_and_requests_and_the_variable_override_it(probe, monkeypatch):
    probe(FAST_BF16)
    assert train_dtype("cpu")[0] == torch.bfloat16
    assert train_dtype("cpu", "float32") == (torch.float32, "asked for")
    probe(SLOW_BF16)
    assert train_dtype("cpu")[0] == torch.float32
    assert train_dtype("cpu", "bfloat16")[0] == torch.bfloat16
    monkeypatch.setenv(device.TRAIN_DTYPE_ENV, "bfloat16")
    assert train_dtype("cpu") == (torch.bfloat16, "GLM5_TRAIN_DTYPE=bfloat16")
    monkeypatch.setenv(device.TRAIN_DTYPE_ENV, "fp16")
    with pytest.raises(ValueError, match="GLM5_TRAIN_DTYPE='fp16': use one of auto, float32, bfloat16"):
        train_dtype("cpu")
    with pytest.raises(ValueError, match="training dtype 'float16'"):
        train_dtype("cpu", "float16")


def test_the_real_probe_returns_two_positive_times():  # what it measures is machine-dependent: not asserted
    fp32, bf16 = device.bf16_probe("cpu")
    assert 0 < fp32 < float("inf") and 0 < bf16 < float("inf")


def test_glm5_train_dtype_flag_sets_the_recipe():
    args = build_parser().parse_args(["train", "--preset", "smoke", "--out", "x", "--dtype", "bf16"])
    assert load_recipe(args.preset, None, None, None, args.dtype).dtype == "bfloat16"
    assert load_recipe("smoke", None, None, None, "fp32").dtype == "float32"
    assert load_recipe("smoke", None, None, None, None).dtype == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--out", "x", "--dtype", "fp16"])


def _linear_output_dtypes(trainer: Trainer) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
        for m in trainer.model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    record = trainer.train_step()
    for h in hooks:
        h.remove()
    assert isinstance(record["loss"], float) and record["loss"] == record["loss"]  # a finite fp32/64 number
    return seen


@pytest.mark.parametrize("timings, expected", [(FAST_BF16, torch.bfloat16), (SLOW_BF16, torch.float32)])
def test_auto_runs_the_training_step_in_the_chosen_dtype(base, tmp_path, probe, timings, expected):
    probe(timings)
    trainer = Trainer(smoke_recipe(steps=2), run_folder(base, tmp_path / "run"), quiet=True)
    assert trainer.dtype == expected
    assert _linear_output_dtypes(trainer) == {expected}  # every projection, the LM head included
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 master weights
    states = [s for s in trainer.optimizer.state.values() if "exp_avg" in s]
    assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states)
    assert trainer.trainer_state()["dtype"] == str(expected).removeprefix("torch.")


def test_auto_that_picks_fp32_is_the_float32_run_exactly(base, tmp_path, probe):
    probe(SLOW_BF16)
    auto = Trainer(smoke_recipe(steps=2), run_folder(base, tmp_path / "auto"), quiet=True)
    fp32 = Trainer(smoke_recipe(steps=2, dtype="float32"), run_folder(base, tmp_path / "fp32"), quiet=True)
    assert losses(auto.fit()) == losses(fp32.fit())


@pytest.mark.slow
def test_a_bf16_run_resumes_exactly_and_an_auto_run_keeps_its_dtype(base, tmp_path, probe):
    probe(FAST_BF16)  # "auto" -> bf16
    whole = Trainer(smoke_recipe(steps=4), run_folder(base, tmp_path / "whole"), quiet=True)
    expected = losses(whole.fit())
    first = Trainer(smoke_recipe(steps=4), run_folder(base, tmp_path / "parts"), quiet=True)
    first.train_step()
    first.train_step()
    first.save()
    probe(SLOW_BF16)  # the probe now says fp32: the resumed run still trains in bf16, as it started
    second = Trainer(smoke_recipe(steps=4), tmp_path / "parts", quiet=True)
    assert second.dtype == torch.float32
    rest = second.fit()
    assert second.dtype == torch.bfloat16 and [r["dtype"] for r in rest] == ["bfloat16"] * 2
    assert losses(rest) == expected[2:]
