"""The vocabulary layout: which token ids are text, image codes and specials.

One object owns the id ranges, in this order:

    [0, text_size)                          the text tokenizer's ids (its own bos/eos/pad inside)
    [image_start, image_start + image_size) the image codes (VQ codebook indices, offset)
    then one id per added special           <boi>, <eoi> (and <pad> if the text tokenizer has none)
    then padding                            up to a multiple of make_vocab_size_divisible_by x TP

Example (the paper's 1B model): 50,432 text + 16,384 image + 2 specials = 66,818 ids,
padded to 66,944 at TP=1 (divisor 128).

The layout without padding is saved beside every token file (the sidecar JSON) and inside every
checkpoint; the padded size is a property of the model and is saved with the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Protocol


class VocabMismatchError(ValueError):
    """Two vocabulary layouts that must agree do not."""


class TextVocabulary(Protocol):
    """What the layout reads from a text tokenizer (tokenizers/text.py's TextTokenizer)."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def pad_id(self) -> int | None: ...


class Codebook(Protocol):
    """What the layout reads from an image tokenizer (tokenizers/image.py's ImageTokenizer)."""

    @property
    def codebook_size(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class VocabLayout:
    text_size: int
    image_size: int
    bos_id: int  # inside the text range: the text tokenizer's own ids
    eod_id: int
    added_specials: tuple[str, ...] = ("<boi>", "<eoi>")
    text_pad_id: int | None = None  # the text tokenizer's pad id, if it has one

    def __post_init__(self) -> None:
        if self.text_size <= 0 or self.image_size < 0:
            raise ValueError(f"vocab: text_size must be > 0 and image_size >= 0, got "
                             f"{self.text_size} and {self.image_size}")
        for name in ("bos_id", "eod_id"):
            value = getattr(self, name)
            if not 0 <= value < self.text_size:
                raise ValueError(f"vocab: {name}={value} is outside the text range "
                                 f"[0, {self.text_size})")
        if self.text_pad_id is None and "<pad>" not in self.added_specials:
            object.__setattr__(self, "added_specials", tuple(self.added_specials) + ("<pad>",))
        object.__setattr__(self, "added_specials", tuple(self.added_specials))

    @classmethod
    def from_tokenizers(cls, text: TextVocabulary, image: Codebook | None = None, *,
                        image_size: int | None = None) -> VocabLayout:
        """The layout of a text tokenizer plus an image codebook: the image tokenizer's, or
        `image_size` codes where none is at hand (text-only token files, whose layout must
        still match the image-caption files they are blended with)."""
        if image is not None:
            if image_size is not None and image_size != image.codebook_size:
                raise ValueError(f"vocab: image_size={image_size} but the image tokenizer has "
                                 f"{image.codebook_size} codes")
            image_size = image.codebook_size
        if image_size is None:
            raise ValueError("vocab: the layout needs an image tokenizer or image_size")
        return cls(text_size=text.vocab_size, image_size=image_size, bos_id=text.bos_id,
                   eod_id=text.eos_id, text_pad_id=text.pad_id)

    # ---- ranges -------------------------------------------------------------------------
    @property
    def image_start(self) -> int:
        return self.text_size

    @property
    def specials_start(self) -> int:
        return self.text_size + self.image_size

    @property
    def size(self) -> int:
        """Number of real ids (text + image + added specials), before padding."""
        return self.specials_start + len(self.added_specials)

    def special_id(self, name: str) -> int:
        try:
            return self.specials_start + self.added_specials.index(name)
        except ValueError:
            raise KeyError(f"vocab: no special {name!r}; the layout has "
                           f"{list(self.added_specials)}") from None

    @property
    def boi_id(self) -> int:
        return self.special_id("<boi>")

    @property
    def eoi_id(self) -> int:
        return self.special_id("<eoi>")

    @property
    def pad_id(self) -> int:
        return self.text_pad_id if self.text_pad_id is not None else self.special_id("<pad>")

    def image_token(self, code: Any) -> Any:
        """Map codebook indices (int or array) to token ids."""
        return code + self.image_start

    def image_code(self, token: Any) -> Any:
        return token - self.image_start

    def ranges(self) -> dict[str, tuple[int, int]]:
        out = {"text": (0, self.text_size),
               "image": (self.image_start, self.image_start + self.image_size)}
        for name in self.added_specials:
            i = self.special_id(name)
            out[name] = (i, i + 1)
        return out

    # ---- padding ------------------------------------------------------------------------
    def padded_size(self, make_vocab_size_divisible_by: int = 128,
                    tensor_model_parallel_size: int = 1) -> int:
        """Megatron's rule: round up to a multiple of divisor x TP."""
        multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.size // multiple) * multiple

    # ---- persistence and checks ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["added_specials"] = list(self.added_specials)
        d["ranges"] = {k: list(v) for k, v in self.ranges().items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VocabLayout:
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields}
        kwargs["added_specials"] = tuple(kwargs.get("added_specials", ()))
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> VocabLayout:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def differences(self, other: VocabLayout) -> list[str]:
        """Human-readable differences, one per range or id that disagrees."""
        out = []
        mine, theirs = self.ranges(), other.ranges()
        for name in sorted(set(mine) | set(theirs)):
            a, b = mine.get(name), theirs.get(name)
            if a != b:
                out.append(f"{name}: {_fmt(a)} vs {_fmt(b)}")
        for name in ("bos_id", "eod_id", "pad_id"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"{name}: {a} vs {b}")
        return out

    def check_matches(self, other: VocabLayout, *, mine: str, theirs: str) -> None:
        """Raise, naming each differing range as `name: <theirs> vs <mine>`."""
        diffs = other.differences(self)
        if diffs:
            raise VocabMismatchError(
                f"vocabulary layout of {theirs} differs from {mine} (theirs vs mine): "
                + "; ".join(diffs))


def _fmt(r: tuple[int, int] | None) -> str:
    return "absent" if r is None else f"[{r[0]}, {r[1]})"
