"""GLM5Tokenizer: a byte-level BPE with every GLM-5 special token as one id, trained offline or loaded.

Vocabulary layout of a tokenizer trained here (``GLM5Tokenizer.train(corpus, vocab_size=N)``)::

    0 .. N-32        byte-level BPE (the 256 byte symbols first, then merges; if the corpus is too
                     small to reach N-31 entries the tail is padded with ``<|reserved_base_i|>``)
    N-31 + offset    the 31 GLM special tokens of ``SPECIAL_TOKENS``, in the real GLM-5 order

The offsets are those of the real GLM-5 tokenizer, where the first special id is 154820:
``<|endoftext|>`` +0, ``[MASK]`` +1, ``[gMASK]`` +2, ``[sMASK]`` +3, ``<sop>`` +4, ``<eop>`` +5,
``<|system|>`` +6, ``<|user|>`` +7, ``<|assistant|>`` +8, ``<|observation|>`` +9, the multimodal and
code markers +10..+20 (order taken from the GLM-4.5 token list; unused by the text model), ``<think>``
+21, ``</think>`` +22, ``<tool_call>`` +23, ``</tool_call>`` +24, ``<tool_response>`` +25,
``</tool_response>`` +26, ``<arg_key>`` +27, ``</arg_key>`` +28, ``<arg_value>`` +29, ``</arg_value>`` +30.
So ``id - first_special_id`` is the same number here and in GLM-5.

``from_pretrained`` also reads any other HF ``tokenizer.json`` (a real GLM or Qwen file with
``added_tokens``); chat rendering then needs the GLM special tokens to be present.

Text is encoded literally by default: a special-token string spelled inside it (``<|user|>``,
``</think>``, ``[gMASK]``, ...) becomes the ordinary byte-level tokens of its characters, never the
special id, so text from users, tools or a corpus cannot forge a turn, a tool result or reasoning.
Only the chat template (``glm5.tokenizer.chat``) and callers that pass ``allow_special=True`` put
special ids into a sequence.
"""

from __future__ import annotations

import json
import os
import sysconfig
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from glm5.tokenizer.chat import render_chat, tokenize_chat
from glm5.tokenizer.special import (  # noqa: F401 (re-exported: the tokenizer's public constants)
    ENDOFTEXT,
    EOS_TOKENS,
    GLM5_FIRST_SPECIAL_ID,
    PROMPT_PREFIX,
    SPECIAL_TOKENS,
)

# GPT-4-style pre-split (digits in groups of up to three, as GLM-4 does), then byte-level symbols.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_MAX_LENGTH = 202752
_TOKENIZER_FILE = "tokenizer.json"
_CONFIG_FILE = "tokenizer_config.json"
_TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".json", ".jsonl", ".csv", ".html")


def _special(content: str) -> AddedToken:
    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)


def default_corpus_files() -> list[Path]:
    """The CPython standard library's ``.py`` files, sorted, without tests and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)]
    return sorted(files)


def expand_corpus_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given, and every text file (by suffix) under the directories given, sorted."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES))
        elif path.is_file():
            out.append(path)
        else:
            raise ValueError(f"corpus path {str(path)!r} does not exist; pass text files or folders of them")
    if not out:
        raise ValueError("the corpus is empty: no text files were found under the paths given")
    return out


def _iter_files(files: Sequence[Path], on_bytes: Callable[[int], None] | None) -> Iterator[str]:
    for path in files:
        data = path.read_bytes()
        if on_bytes is not None:
            on_bytes(len(data))
        yield data.decode("utf-8", errors="replace")


def _token_content(value: Any) -> str | None:
    """``eos_token`` in a tokenizer_config is a string or an AddedToken-like dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path, what: str) -> tuple[Any, str]:
    """The parsed JSON and its text."""
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text), text
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        fix = "re-export or re-save the file"
        raise ValueError(f"could not read {what} {str(path)!r}: {exc}; {fix}") from exc


def _atomic_write(path: Path, text: str) -> None:
    """Write a sibling temp file (mode from the umask, like any new file), then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class GLM5Tokenizer:
    """HF ``tokenizers`` wrapper with GLM-5 special tokens, eos ids and the GLM-5 chat template."""

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any] | None = None) -> None:
        self._tok = tokenizer
        self.config: dict[str, Any] = dict(config or {})
        """Contents of tokenizer_config.json (written back by ``save_pretrained``)."""
        self._literal: tuple[int, Tokenizer] | None = None  # (vocab size it was built for, backend copy)
        self._literal_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # the literal copy is rebuilt on demand; a lock cannot be pickled
        return {"_tok": self._tok, "config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["_tok"], state["config"])

    # ---------------------------------------------------------------- construction
    @classmethod
    def train(
        cls,
        corpus: Sequence[str | os.PathLike[str]] | Iterable[str],
        vocab_size: int,
        *,
        min_frequency: int = 2,
        on_bytes: Callable[[int], None] | None = None,
    ) -> GLM5Tokenizer:
        """Train a byte-level BPE whose total size (BPE + 31 specials) is exactly ``vocab_size``.

        ``corpus`` is either a list/tuple of text-file paths or any other iterable of text strings.
        ``on_bytes`` is called with the size of each file as it is read (for progress bars).
        """
        if isinstance(corpus, (str, bytes, os.PathLike)):
            raise ValueError("corpus must be a list of file paths or an iterator of texts, not one string")
        base_size = vocab_size - len(SPECIAL_TOKENS)
        if base_size < 256:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: it needs 256 byte symbols plus "
                f"{len(SPECIAL_TOKENS)} special tokens, so use at least {256 + len(SPECIAL_TOKENS)}"
            )
        if isinstance(corpus, (list, tuple)):
            texts: Iterable[str] = _iter_files(expand_corpus_paths(corpus), on_bytes)
        else:
            texts = corpus
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        trainer = trainers.BpeTrainer(
            vocab_size=base_size,
            min_frequency=min_frequency,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
        )
        tok.train_from_iterator(texts, trainer)
        # A small corpus cannot supply base_size merges; pad so the specials keep their fixed place.
        shortfall = base_size - tok.get_vocab_size()
        tok.add_special_tokens([_special(f"<|reserved_base_{i}|>") for i in range(shortfall)])
        tok.add_special_tokens([_special(t) for t in SPECIAL_TOKENS])
        assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(base_size, vocab_size))
        return cls(tok, _default_config())

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str]) -> GLM5Tokenizer:
        """Load ``tokenizer.json`` (+ optional ``tokenizer_config.json``) from a folder.

        A path to the ``tokenizer.json`` file itself is accepted too.
        """
        path = Path(folder)
        if path.is_file():
            tok_file, path = path, path.parent
        elif path.is_dir():
            tok_file = path / _TOKENIZER_FILE
            if not tok_file.is_file():
                raise ValueError(
                    f"{str(path)!r} has no {_TOKENIZER_FILE}; save one with GLM5Tokenizer.save_pretrained "
                    "or train one with `glm5 tokenizer train`"
                )
        else:
            fix = f"pass a folder that holds {_TOKENIZER_FILE}"
            raise ValueError(f"tokenizer folder {str(path)!r} does not exist; {fix}")
        spec, text = _read_json(tok_file, "tokenizer file")
        if not isinstance(spec, dict) or "model" not in spec:
            raise ValueError(f"{str(tok_file)!r} is not a HF tokenizers file (no 'model' entry)")
        try:
            tok = Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises a bare Exception on a bad spec
            raise ValueError(f"could not load {str(tok_file)!r}: {exc}") from exc
        _check_added_ids(tok, spec, tok_file)
        config: dict[str, Any] = {}
        cfg_file = path / _CONFIG_FILE
        if cfg_file.is_file():
            config, _ = _read_json(cfg_file, "tokenizer config")
            if not isinstance(config, dict):
                raise ValueError(f"{str(cfg_file)!r} must hold a JSON object")
        return cls(tok, config)

    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (each atomically) into ``folder``."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / _TOKENIZER_FILE, self._tok.to_str(pretty=False))
        config = {**_default_config(), **self.config}
        config["added_tokens_decoder"] = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(self._tok.get_added_tokens_decoder().items())
        }
        _atomic_write(out / _CONFIG_FILE, json.dumps(config, ensure_ascii=False, indent=2) + "\n")
        return out

    # ---------------------------------------------------------------- vocabulary
    @property
    def backend(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def special_token_ids(self) -> dict[str, int]:
        """The GLM special tokens this vocabulary has, by name."""
        ids = {t: self._tok.token_to_id(t) for t in SPECIAL_TOKENS}
        return {t: i for t, i in ids.items() if i is not None}

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: ``<|endoftext|>``, ``<|user|>``, ``<|observation|>`` (those present).

        A non-GLM vocabulary falls back to tokenizer_config's ``eos_token``.
        """
        ids = [i for i in (self._tok.token_to_id(t) for t in EOS_TOKENS) if i is not None]
        if not ids:
            name = _token_content(self.config.get("eos_token"))
            found = self._tok.token_to_id(name) if name else None
            ids = [found] if found is not None else []
        return ids

    @property
    def eos_token_id(self) -> int | None:
        """The primary eos id (``<|endoftext|>`` for GLM)."""
        ids = self.eos_token_ids
        return ids[0] if ids else None

    @property
    def pad_token_id(self) -> int | None:
        """tokenizer_config's ``pad_token``, else ``<|endoftext|>`` (GLM pads with it)."""
        name = _token_content(self.config.get("pad_token")) or ENDOFTEXT
        found = self._tok.token_to_id(name)
        return found if found is not None else self.eos_token_id

    def require_special_ids(self, tokens: Iterable[str]) -> dict[str, int]:
        """Ids of ``tokens``; a ValueError listing the missing ones if the vocabulary lacks any."""
        tokens = list(dict.fromkeys(tokens))
        ids = {t: self._tok.token_to_id(t) for t in tokens}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(
                f"this tokenizer lacks the GLM special tokens {missing}; the GLM-5 chat format needs "
                "them as single tokens. Train one with `glm5 tokenizer train` (or GLM5Tokenizer.train) "
                "or load a real GLM tokenizer.json"
            )
        return {t: i for t, i in ids.items() if i is not None}

    # ---------------------------------------------------------------- encode / decode
    def _prefix_ids(self) -> list[int]:
        return list(self.require_special_ids(PROMPT_PREFIX).values())

    def _literal_backend(self) -> Tokenizer:
        """A copy of the backend that never matches an added token inside text.

        Every added token is marked special on this copy (a real tokenizer.json may flag ``<think>``
        & co. ``special: false``, as Qwen3 does, and HF only splits special ones) and
        ``encode_special_tokens`` is set, so text encodes as if the vocabulary had no added tokens.
        The flag is set once on this private copy, never toggled on a shared instance, so concurrent
        encodes from server threads are safe. Built on first use, and again if tokens are added to
        the backend.
        """
        size = self._tok.get_vocab_size(with_added_tokens=True)
        cached = self._literal
        if cached is not None and cached[0] == size:
            return cached[1]
        with self._literal_lock:
            if self._literal is not None and self._literal[0] == size:
                return self._literal[1]
            spec = json.loads(self._tok.to_str())
            for entry in spec.get("added_tokens") or []:
                if isinstance(entry, dict):
                    entry["special"] = True
            literal = Tokenizer.from_str(json.dumps(spec))
            literal.encode_special_tokens = True
            self._literal = (size, literal)
            return literal

    def encode(
        self, text: str, add_special_tokens: bool = False, *, allow_special: bool = False
    ) -> list[int]:
        """Token ids of ``text``, read literally unless ``allow_special``.

        By default special-token strings inside ``text`` (``<|user|>``, ``<think>``, ``[gMASK]``, any
        added token of the tokenizer.json) are plain text: they encode to the byte-level tokens of their
        characters, never to the special id. This is the safe choice for anything that came from a
        user, a tool, a document or a model. ``allow_special=True`` parses them into their single ids
        (what HF ``tokenizer(text)`` and vLLM do with raw text): only for text whose markers are
        meant, e.g. a scripted model output or an expected id sequence written as template text.
        Text without special-token strings encodes the same either way.

        ``add_special_tokens=True`` prepends the GLM prompt prefix ``[gMASK]<sop>`` (as its two ids).
        """
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        backend = self._tok if allow_special else self._literal_backend()
        ids = backend.encode(text, add_special_tokens=False).ids
        return self._prefix_ids() + ids if add_special_tokens else ids

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = False, *, allow_special: bool = False
    ) -> list[list[int]]:
        """``encode`` for many texts (parallel in the Rust backend); literal unless ``allow_special``."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("encode_batch expects a list of str")
        prefix = self._prefix_ids() if add_special_tokens else []
        backend = self._tok if allow_special else self._literal_backend()
        return [prefix + e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens are kept unless ``skip_special_tokens``."""
        ids = [int(i) for i in ids]
        size = self.vocab_size
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (size {size})")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    # ---------------------------------------------------------------- chat
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        enable_thinking: bool = True,
        clear_thinking: bool = True,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        return_loss_mask: bool = True,
    ) -> tuple[list[int], list[int]] | list[int] | str:
        """Render messages in the GLM-5 chat format (see ``glm5.tokenizer.chat``).

        ``tokenize=False`` returns the text (HF convention). Otherwise returns ``(ids, loss_mask)``,
        or just ``ids`` when ``return_loss_mask`` is false. The loss mask is 1 on what the assistant
        generates: its reasoning and the closing ``</think>``, content, tool calls, and the stop token
        that ends its turn (the next ``<|user|>``/``<|observation|>``, or an ``<|endoftext|>`` appended
        to the ids when the conversation ends with an assistant turn and no generation prompt).
        """
        if not tokenize:
            return render_chat(
                messages,
                tools,
                enable_thinking=enable_thinking,
                clear_thinking=clear_thinking,
                add_generation_prompt=add_generation_prompt,
            )
        ids, mask = tokenize_chat(
            self,
            messages,
            tools,
            enable_thinking=enable_thinking,
            clear_thinking=clear_thinking,
            add_generation_prompt=add_generation_prompt,
        )
        return (ids, mask) if return_loss_mask else ids

    def __repr__(self) -> str:
        first = self._tok.token_to_id(ENDOFTEXT)
        return f"GLM5Tokenizer(vocab_size={self.vocab_size}, first_special_id={first})"


def _default_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": ENDOFTEXT,
        "pad_token": ENDOFTEXT,
        "model_max_length": _MAX_LENGTH,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
    }


def _check_added_ids(tok: Tokenizer, spec: dict[str, Any], tok_file: Path) -> None:
    """HF tokenizers silently renumbers added tokens whose ids leave a gap; catch that here."""
    for entry in spec.get("added_tokens") or []:
        if not isinstance(entry, dict) or "content" not in entry or "id" not in entry:
            continue
        actual = tok.token_to_id(entry["content"])
        if actual != entry["id"]:
            raise ValueError(
                f"{str(tok_file)!r}: added token {entry['content']!r} is declared with id {entry['id']} "
                f"but loads as id {actual}; added_tokens must follow the model vocabulary without gaps"
            )
