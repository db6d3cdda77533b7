"""Text tokenizers behind one small interface.

The vocabulary layout (megatron_t2i.vocab) only needs a tokenizer's size and its bos/eos/pad
ids; token files record `identity()` so a dataset built with another tokenizer is caught.
`SentencePieceTokenizer` is the one used by the demo and the paper-style recipes.
"""

from __future__ import annotations

import abc
import hashlib
import io
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm


class TextTokenizer(abc.ABC):
    """What the data pipeline needs from a text tokenizer: ids in [0, vocab_size)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos (the sequence builder adds those)."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def bos_id(self) -> int: ...

    @property
    @abc.abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abc.abstractmethod
    def pad_id(self) -> int | None:
        """The tokenizer's own pad id, or None (the layout then adds a <pad> special)."""

    @abc.abstractmethod
    def identity(self) -> str:
        """A content hash: equal identities mean equal tokenizations."""


class SentencePieceTokenizer(TextTokenizer):
    """A sentencepiece model held in memory (so identity() hashes exactly what is used)."""

    def __init__(self, model_proto: bytes) -> None:
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int,
              model_prefix: str | Path) -> SentencePieceTokenizer:
        """Train a BPE model with exactly `vocab_size` ids; write `<model_prefix>.model`.

        Ids 0-3 are unk, bos, eos, pad. A small corpus may not support that many BPE merges;
        the shortfall is then filled with `<unused_N>` pieces (never produced by encode), so
        the vocabulary size the layout is built from is always the one asked for.
        """
        texts = list(texts)
        try:
            proto = _train_bpe(texts, vocab_size, reserved=0)
        except RuntimeError as e:
            most = re.search(r"value <= (\d+)", str(e))
            if most is None:
                raise ValueError(f"sentencepiece: cannot train a {vocab_size}-id BPE model on "
                                 f"{len(texts)} texts: {e}") from None
            proto = _train_bpe(texts, vocab_size, reserved=vocab_size - int(most.group(1)))
        path = Path(f"{model_prefix}.model")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(proto)
        tokenizer = cls(proto)
        assert tokenizer.vocab_size == vocab_size, (tokenizer.vocab_size, vocab_size)
        return tokenizer

    @classmethod
    def load(cls, path: str | Path) -> SentencePieceTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model {path} not found")
        return cls(path.read_bytes())

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int | None:
        pad = self._sp.pad_id()
        return None if pad < 0 else pad

    def identity(self) -> str:
        return hashlib.sha256(self._proto).hexdigest()


def _train_bpe(texts: list[str], vocab_size: int, reserved: int) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        user_defined_symbols=[f"<unused_{i}>" for i in range(reserved)],
        character_coverage=1.0, num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    return model.getvalue()
