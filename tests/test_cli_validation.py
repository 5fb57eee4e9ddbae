"""Every `glm5` command checks its flags before it loads or writes: one `glm5:` line, exit code 2, nothing left
behind; and the newcomer-facing output (train phases, serve banner, chat commands, plan heading)."""

from __future__ import annotations

import builtins
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from configs import CHECKPOINT

from glm5.cli import main
from glm5.config import GLM5Config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")


def _one_error_line(capsys, flag: str) -> str:
    """The command wrote exactly one stderr line, `glm5: ...`, naming `flag`, and no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("glm5:"), lines[0]
    assert flag in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


def _rejects(capsys, argv: list[str], flag: str, *created: Path) -> str:
    assert main(argv) == 2
    line = _one_error_line(capsys, flag)
    for path in created:
        assert not path.exists(), f"{path} was left behind"
    return line


@pytest.fixture()
def config_only(tmp_path) -> Path:
    """A checkpoint folder with a tiny config.json and no weights: anything that loads it fails differently."""
    folder = tmp_path / "tiny-ckpt"
    folder.mkdir()
    GLM5Config.from_preset("tiny").replace(max_position_embeddings=64).save(folder)
    return folder


# --- serve --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag, value",
    [
        ("--port", "99999"),
        ("--port", "0"),
        ("--port", "http"),
        ("--max-body-mb", "-1"),
        ("--max-model-len", "-5"),
        ("--max-pending", "0"),
        ("--max-seqs-per-request", "0"),
        ("--threads", "0"),
        ("--graceful-timeout", "-1"),
        ("--max-num-seqs", "0"),
        ("--speculative-tokens", "7"),
        ("--decode-steps", "0"),
        ("--max-body-mb", "nan"),
    ],
)
def test_serve_rejects_bad_numbers_before_loading(config_only, capsys, flag, value):
    line = _rejects(capsys, ["serve", "--model", str(config_only), flag, value], flag)
    assert value in line or "got" in line


def test_serve_rejects_a_max_model_len_beyond_the_models_context(config_only, capsys):
    line = _rejects(
        capsys, ["serve", "--model", str(config_only), "--max-model-len", "65"], "--max-model-len"
    )
    assert "max_position_embeddings" in line and "64" in line


def test_serve_rejects_a_port_in_use_before_loading(config_only, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _rejects(capsys, ["serve", "--model", str(config_only), "--port", str(port)], "--port")


def test_serve_says_what_it_loads_and_where_it_serves(config_only, capsys, monkeypatch):
    import glm5.serve.server as server

    calls = {}
    monkeypatch.setattr(server, "build_engine", lambda model, *a, **k: calls.setdefault("model", model))
    monkeypatch.setattr(server, "serve", lambda engine, config, **k: calls.setdefault("serve", (config, k)))
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert main(["serve", "--model", str(config_only), "--port", str(port)]) == 0
    err = capsys.readouterr().err
    assert f"loading {config_only}" in err
    assert f"serving on http://127.0.0.1:{port} (model tiny-ckpt)" in err
    assert calls["serve"][0].model_name == "tiny-ckpt"


# --- generate / chat ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag, value",
    [
        ("--max-tokens", "0"),
        ("--temperature", "-1"),
        ("--top-p", "0"),
        ("--top-k", "-2"),
        ("--min-p", "2"),
        ("--repetition-penalty", "0"),
        ("--speculative-tokens", "-1"),
        ("--decode-steps", "65"),
    ],
)
def test_generate_rejects_bad_sampling_flags_before_loading(config_only, capsys, flag, value):
    _rejects(capsys, ["generate", "--model", str(config_only), "--prompt", "hi", flag, value], flag)


def test_generate_rejects_a_prompt_that_is_not_utf8_in_one_line(config_only):
    # Python turns the argv bytes ff fe into lone surrogates; the tokenizer would raise deep inside encode.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "glm5.cli",
            "generate",
            "--model",
            os.fsencode(config_only),
            "--prompt",
            b"\xff\xfe",
        ],
        capture_output=True,
        cwd=ROOT,
        timeout=120,
    )
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2, err
    lines = err.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("glm5:") and "--prompt" in lines[0] and "0xff" in lines[0]
    ), err
    assert "Traceback" not in err


class _FakeEngine:
    """Answers every request with one finished step whose text is "ok"."""

    def make_request(self, request_id, prompt, params):
        return SimpleNamespace(request_id="r0", finished=False)

    def submit(self, request):
        self.request = request

    def step(self):
        self.request.finished = True
        return [SimpleNamespace(request_id="r0", outputs=[SimpleNamespace(text="ok", token_ids=[1])])]


class _FakeTokenizer:
    def __init__(self):
        self.prompts: list[tuple[list, bool]] = []

    def apply_chat_template(self, messages, tools=None, enable_thinking=True, return_loss_mask=False):
        self.prompts.append(([m["content"] for m in messages], enable_thinking))
        return [1, 2, 3]


def _chat(monkeypatch, capsys, lines: list[str], *flags: str) -> tuple[str, _FakeTokenizer]:
    import glm5.engine.cli as engine_cli

    tok = _FakeTokenizer()
    monkeypatch.setattr(
        engine_cli, "build_llm", lambda args: SimpleNamespace(tokenizer=tok, engine=_FakeEngine())
    )
    feed = iter(lines)
    monkeypatch.setattr(builtins, "input", lambda *a: next(feed))
    assert main(["chat", "--preset", "tiny", *flags]) == 0
    return capsys.readouterr().out, tok


def test_chat_unknown_commands_are_not_sent_to_the_model(monkeypatch, capsys):
    out, tok = _chat(monkeypatch, capsys, ["/resett", "/help", "hello", "/exit"])
    assert "unknown command /resett; commands: /reset, /think on|off, /exit" in out
    assert "/think on|off" in out.split("unknown command")[0]  # /help lists them too
    assert tok.prompts == [(["hello"], True)]


def test_chat_think_accepts_only_on_or_off(monkeypatch, capsys):
    out, tok = _chat(
        monkeypatch, capsys, ["/think maybe", "a", "/think on", "b", "/think", "/exit"], "--no-thinking"
    )
    assert "/think takes on or off" in out
    assert "thinking on" in out
    assert tok.prompts == [(["a"], False), (["a", "ok", "b"], True)]


# --- train ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, field",
    [
        ('lr = "fast"', "lr"),
        ("lr = -1", "lr"),
        ("steps = 2.5", "steps"),
        ("warmup_steps = -3", "warmup_steps"),
        ("grad_clip = -1.0", "grad_clip"),
        ("min_lr_ratio = 2.0", "min_lr_ratio"),
        ("betas = [0.9, 1.5]", "betas"),
        ('[data]\nmax_corpus_bytes = "lots"', "max_corpus_bytes"),
    ],
)
def test_train_rejects_bad_recipe_values_before_writing(tmp_path, capsys, body, field):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'preset = "smoke"\n{body}\n')
    out = tmp_path / "run"
    line = _rejects(capsys, ["train", "--config", str(recipe), "--out", str(out)], field, out)
    assert str(recipe) in line


@pytest.mark.parametrize("flag, value", [("--time-limit", "-1"), ("--time-limit", "0"), ("--steps", "0")])
def test_train_rejects_bad_flags_naming_them(tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    line = _rejects(capsys, ["train", "--preset", "smoke", flag, value, "--out", str(out)], flag, out)
    assert "mtp_depth" not in line


def test_train_rejects_an_out_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    _rejects(capsys, ["train", "--preset", "smoke", "--out", str(out)], "--out")
    assert out.read_text() == "keep me"


def test_train_shows_each_phase(tmp_path, capsys):
    assert main(["train", "--preset", "smoke", "--steps", "1", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    phases = ["training a 512-id tokenizer", "preparing token files", "evaluating", "exporting"]
    for phase in phases:
        assert phase in out, phase
    positions = [out.index(p) for p in phases]
    assert positions == sorted(positions) and positions[-1] < out.index("glm5 train")  # before the summary


# --- rl -------------------------------------------------------------------------------------------------------
def test_rl_rejects_a_missing_init_and_creates_no_out(tmp_path, capsys):
    out = tmp_path / "rl-out"
    _rejects(
        capsys,
        ["rl", "--recipe", "math-sync", "--init", str(tmp_path / "nonexistent"), "--out", str(out)],
        "--init",
        out,
    )


def test_rl_rejects_an_init_that_is_not_a_checkpoint_and_creates_no_out(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "rl-out"
    _rejects(
        capsys,
        ["rl", "--recipe", "math-sync", "--init", str(tmp_path / "empty"), "--out", str(out)],
        "--init",
        out,
    )


def test_rl_rejects_steps_that_are_not_a_number(tmp_path, capsys):
    out = tmp_path / "rl-out"
    _rejects(capsys, ["rl", "--recipe", "digits-sync", "--steps", "x", "--out", str(out)], "--steps", out)


# --- tokenizer ---------------------------------------------------------------------------------------------
def test_tokenizer_train_bounds_the_vocabulary(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text to train on\n" * 10)
    out = tmp_path / "tok"
    line = _rejects(
        capsys,
        ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "100000000", "--out", str(out)],
        "--vocab-size",
        out,
    )
    assert "1,048,576" in line


def test_tokenizer_train_rejects_an_empty_corpus(tmp_path, capsys):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("")
    out = tmp_path / "tok"
    _rejects(
        capsys,
        ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(out)],
        "--corpus",
        out,
    )


def test_tokenizer_help_says_what_the_group_does():
    parser = __import__("glm5.cli", fromlist=["build_parser"]).build_parser()
    group = parser._subparsers._group_actions[0].choices["tokenizer"]
    assert "inspect" not in (group.description or "") + parser.format_help()
    assert set(group._subparsers._group_actions[0].choices) == {"train"}


# --- convert -------------------------------------------------------------------------------------------------
def test_convert_rejects_shapes_that_contradict_the_config_and_writes_nothing(tmp_path, capsys):
    from glm5.checkpoint.synthetic import write_random_checkpoint

    cfg = CHECKPOINT.replace(vocab_size=64, num_hidden_layers=2, index_topk_pattern="FF")
    src = tmp_path / "src"
    write_random_checkpoint(cfg, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "v_head_dim": 6}))
    dst = tmp_path / "dst"
    line = _rejects(capsys, ["convert", str(src), str(dst), "--to", "fp8"], "kv_b_proj.weight", dst)
    assert "config.json" in line and "shape" in line
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no temporary folder either


def test_convert_rejects_a_bad_shard_size_before_reading(tmp_path, capsys):
    _rejects(
        capsys,
        ["convert", str(tmp_path), str(tmp_path / "dst"), "--to", "fp8", "--max-shard-size", "0"],
        "--max-shard-size",
        tmp_path / "dst",
    )


# --- plan, eval -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag, value",
    [
        ("--context", "0"),
        ("--concurrency", "-1"),
        ("--mfu", "2"),
        ("--margin", "1"),
        ("--devices", "0"),
        ("--price-per-hour", "-3"),
    ],
)
def test_plan_rejects_bad_numbers_naming_the_flag(capsys, flag, value):
    _rejects(capsys, ["plan", flag, value], flag)


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--concurrency", "0"),
        ("--max-tokens", "0"),
        ("--temperature", "-1"),
        ("--k", "0"),
        ("--seq-len", "0"),
    ],
)
def test_eval_rejects_bad_numbers_before_writing(tmp_path, capsys, flag, value):
    out = tmp_path / "eval-out"
    _rejects(capsys, ["eval", "--model", str(tmp_path), flag, value, "--out", str(out)], flag, out)


def test_eval_help_lists_every_task():
    from glm5.eval.tasks import QA_TASKS

    parser = __import__("glm5.cli", fromlist=["build_parser"]).build_parser()
    help_text = parser._subparsers._group_actions[0].choices["eval"].format_help()
    for task in QA_TASKS:
        assert task in help_text, task


def test_plan_heads_its_table_with_the_model_and_never_truncates_at_80_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["plan", "--preset", "glm-5"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert "glm-5" in first and "743.9B parameters" in first and "39.9B active" in first, first
    assert "…" not in out
    for text in (
        "TP1 x DP16 attn, EP16",
        "experts sharded over all devices; MLA/dense/shared/embed TP within a DP group",
        "implied: users at 17 tok/s each on this plan",
    ):
        assert text in out, text


def test_argparse_errors_are_one_line_too(capsys):
    _rejects(capsys, ["serve", "--preset", "tiny", "--bogus"], "--bogus")
