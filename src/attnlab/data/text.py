"""Tokenizers: byte-level BPE (Hugging Face `tokenizers`), raw UTF-8 bytes, characters.

All three share one interface (``Tokenizer``) and reserve ``<eos>``, the
document separator written between documents in train.bin / val.bin.
``decode`` skips nothing: ``<eos>`` renders as the text ``"<eos>"``.

- ``bpe``: trained on the training documents only; ``vocab_size`` includes ``<eos>``.
  Any string round-trips (byte-level), and a literal ``"<eos>"`` in the text is
  encoded as ordinary text, never as the separator.
- ``bytes``: 256 ids = the UTF-8 bytes; ``<eos>`` is byte 0 (NUL, which sources strip).
- ``char``: ``<eos>`` (0), ``<unk>`` (1), then the sorted distinct characters of
  the training documents; unseen characters encode to ``<unk>``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import DataError

EOS = "<eos>"
UNK = "<unk>"
# Document separators recognised in an existing Hugging Face tokenizer file (GPT-2, Llama 3, SentencePiece ones);
# a file with none of them gets <eos> added as one more special token.
EOS_TOKENS = (EOS, "<|endoftext|>", "<|end_of_text|>", "</s>")
KINDS = ("bpe", "bytes", "char")


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype for the token ids of a vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class Tokenizer:
    """Common interface; see BPETokenizer, ByteTokenizer, CharTokenizer."""

    kind: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        raise NotImplementedError

    def save(self, path) -> None:
        raise NotImplementedError

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _ids(ids) -> list[int]:
    """Accept lists, numpy arrays and tensors of ids."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


def _write_json(path, obj: dict) -> None:
    Path(path).write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


# ---------------------------------------------------------------- bytes


class ByteTokenizer(Tokenizer):
    kind = "bytes"
    vocab_size = 256
    eos_id = 0  # NUL never occurs in source text

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        # Split at eos so a partial UTF-8 sequence never swallows the separator.
        parts = bytes(_ids(ids)).split(b"\x00")
        return EOS.join(p.decode("utf-8", errors="replace") for p in parts)

    def save(self, path) -> None:
        _write_json(path, {"kind": "bytes", "vocab_size": 256, "eos_id": 0})


# ----------------------------------------------------------------- char


class CharTokenizer(Tokenizer):
    kind = "char"
    eos_id = 0
    unk_id = 1

    def __init__(self, chars: list[str]):
        if any(len(c) != 1 for c in chars) or list(chars) != sorted(set(chars)):
            raise ValueError("chars must be sorted distinct single characters")
        self.vocab = [EOS, UNK, *chars]
        self.vocab_size = len(self.vocab)
        # Sorted code points: a vectorised searchsorted lookup encodes ~100x faster than a dict loop.
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.int64)

    @classmethod
    def train(cls, docs: list[str]) -> CharTokenizer:
        seen: set[str] = set()
        for d in docs:
            seen.update(d)
        return cls(sorted(seen))

    def encode(self, text: str) -> list[int]:
        return self._encode_np(text).tolist()

    def _encode_np(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)
        if len(self._codepoints) == 0:
            return np.full(len(cps), self.unk_id, dtype=np.int64)
        pos = np.searchsorted(self._codepoints, cps).clip(max=len(self._codepoints) - 1)
        return np.where(self._codepoints[pos] == cps, pos + 2, self.unk_id)

    def decode(self, ids) -> str:
        return "".join(self.vocab[i] for i in _ids(ids))

    def save(self, path) -> None:
        _write_json(
            path, {"kind": "char", "vocab_size": self.vocab_size, "eos_id": 0, "unk_id": 1, "vocab": self.vocab}
        )


# ------------------------------------------------------------------ bpe


class BPETokenizer(Tokenizer):
    kind = "bpe"

    def __init__(self, hf):
        self._tok = hf
        # Text that contains "<eos>" (or any special token) must encode as text, not as the separator id.
        self._tok.encode_special_tokens = True
        # The separator: attnlab's <eos>, else an existing tokenizer file's own end-of-text token.
        self.eos_token = next((t for t in EOS_TOKENS if hf.token_to_id(t) is not None), None)
        if self.eos_token is None:
            raise ValueError(f"BPE tokenizer has no {EOS} token")
        self.eos_id = hf.token_to_id(self.eos_token)
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self._encode_batch = getattr(hf, "encode_batch_fast", hf.encode_batch)  # _fast skips offsets

    @classmethod
    def train(cls, docs: list[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
        return cls(tok)

    @classmethod
    def from_file(cls, path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode(_ids(ids), skip_special_tokens=False)

    def save(self, path) -> None:
        self._tok.save(str(path))


# ------------------------------------------------------------- factory


def train_tokenizer(kind: str, train_docs: list[str], vocab_size: int) -> Tokenizer:
    """A tokenizer of `kind` fitted to the training documents (vocab_size is used by bpe only)."""
    if kind == "bpe":
        return BPETokenizer.train(train_docs, vocab_size)
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer.train(train_docs)
    raise DataError(f"unknown tokenizer {kind!r}: use data.tokenizer=bpe, bytes or char")


def tokenizer_from_file(path, kind: str = "bpe") -> Tokenizer:
    """An existing Hugging Face ``tokenizer.json`` used as is (``data.tokenizer_file``): no training.

    The vocabulary is the file's; its end-of-text token (one of EOS_TOKENS) separates documents, or
    ``<eos>`` is added when it has none. Truncation and padding settings are dropped: documents are
    encoded whole. A ``bytes`` or ``char`` tokenizer.json that attnlab wrote (a run's, for
    ``--tokenizer-from``) is loaded as that tokenizer when ``kind`` names it."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    if kind in ("bytes", "char") and _attnlab_kind(path) == kind:
        return load_tokenizer(path)
    if kind != "bpe":
        raise DataError(
            f"data.tokenizer_file replaces the trained BPE tokenizer, but data.tokenizer={kind}: "
            "set data.tokenizer=bpe (or drop data.tokenizer_file)"
        )
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data.tokenizer_file {str(path)!r} does not exist: pass a Hugging Face tokenizer.json")
    try:
        hf = HFTokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises plain Exception on bad content
        raise DataError(
            f"{p} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0][:120]}): "
            "pass the tokenizer.json of a `tokenizers`/`transformers` tokenizer"
        ) from None
    hf.no_truncation()
    hf.no_padding()
    if not any(hf.token_to_id(t) is not None for t in EOS_TOKENS):
        hf.add_special_tokens([AddedToken(EOS, special=True)])
    return BPETokenizer(hf)


def _attnlab_kind(path) -> str | None:
    """The ``kind`` entry of an attnlab tokenizer.json (None: unreadable or a Hugging Face file)."""
    try:
        obj = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj.get("kind") if isinstance(obj, dict) else None


def load_tokenizer(path) -> Tokenizer:
    """Load a tokenizer.json written by ``Tokenizer.save``."""
    path = Path(path)
    fix = "re-create the dataset with `attnlab prepare ... --force`"
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} is missing: {fix}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable tokenizer JSON ({type(e).__name__}): {fix}") from None
    kind = obj.get("kind") if isinstance(obj, dict) else None
    try:
        if kind == "bytes":
            return ByteTokenizer()
        if kind == "char":
            vocab = obj["vocab"]
            if vocab[:2] != [EOS, UNK]:
                raise ValueError("vocab must start with <eos>, <unk>")
            return CharTokenizer(vocab[2:])
        if isinstance(obj, dict) and "model" in obj:
            return BPETokenizer.from_file(path)
    except Exception as e:  # tokenizers raises plain Exception on bad JSON content
        raise DataError(
            f"{path} is not a valid {kind or 'bpe'} tokenizer ({str(e).splitlines()[0][:120]}): {fix}"
        ) from None
    raise DataError(f"{path} is not an attnlab tokenizer (no 'kind' or 'model' entry): {fix}")
