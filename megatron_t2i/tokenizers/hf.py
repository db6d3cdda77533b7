"""A Hugging Face `tokenizer.json` behind the TextTokenizer interface.

A pretrained LM brings its own tokenizer (OpenLM-1B: the GPT-NeoX BPE). Its embedding table is
often larger than the tokenizer (GPT-NeoX: 50,277 tokens in 50,432 rows), and the layout must
use the table's size, so `vocab_size` may be raised above the tokenizer's own count; the extra
ids are never produced by `encode`.

bos/eos/pad are found by their usual token strings unless given: GPT-NeoX uses
`<|endoftext|>` as both bos and eos and `<|padding|>` as pad; Llama-style files use `<s>`, `</s>`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer

from megatron_t2i.tokenizers.text import TextTokenizer

BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<|endoftext|>", "<bos>", "[CLS]")
EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[SEP]")
PAD_CANDIDATES = ("<pad>", "<|padding|>", "[PAD]", "<|pad|>")


class HFTokenizer(TextTokenizer):
    """A `tokenizers.Tokenizer` from JSON text held in memory (identity hashes exactly that)."""

    def __init__(self, json_text: str, vocab_size: int | None = None,
                 bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, source: str = "<memory>") -> None:
        self._json = json_text
        self._tok = Tokenizer.from_str(json_text)
        self._own_size = self._tok.get_vocab_size(with_added_tokens=True)
        if vocab_size is not None and vocab_size < self._own_size:
            raise ValueError(f"{source}: vocab_size={vocab_size} is smaller than the "
                             f"tokenizer's {self._own_size} tokens")
        self._size = vocab_size or self._own_size
        self._bos = self._special(bos_token, BOS_CANDIDATES, "bos", source)
        self._eos = self._special(eos_token, EOS_CANDIDATES, "eos", source)
        self._pad = self._special(pad_token, PAD_CANDIDATES, "pad", source, required=False)

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> HFTokenizer:
        """Read a `tokenizer.json` (or a folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"Hugging Face tokenizer file {path} not found")
        return cls(path.read_text(encoding="utf-8"), source=str(path), **kwargs)

    def _special(self, token: str | None, candidates: tuple[str, ...], role: str, source: str,
                 required: bool = True) -> int | None:
        for name in (token,) if token is not None else candidates:
            found = self._tok.token_to_id(name)
            if found is not None:
                return found
        if token is not None:
            raise ValueError(f"{source}: {role} token {token!r} is not in the vocabulary")
        if required:
            raise ValueError(f"{source}: no {role} token among {list(candidates)}; name it "
                             f"explicitly ({role}_token=...)")
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) < self._own_size])

    @property
    def vocab_size(self) -> int:
        return self._size

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int | None:
        return self._pad

    def identity(self) -> str:
        h = hashlib.sha256(self._json.encode("utf-8"))
        h.update(json.dumps([self._size, self._bos, self._eos, self._pad]).encode())
        return h.hexdigest()
