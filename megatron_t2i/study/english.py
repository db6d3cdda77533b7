"""Real English text available offline: the docstrings of Python's standard library.

The mini-study pretrains its small language model on this prose, so that "pretrained" means
something: a model that has learnt English word statistics the captions can draw on, and that
can forget them. The docstrings are read with `ast` from the source files (no module is
imported, so nothing runs), in sorted path order, and cut into prose paragraphs: code examples
(`>>>`), tables, option lists and other lines that are not sentences are dropped, repeated
paragraphs kept once. The same Python installation gives the same corpus byte for byte.

Files are assigned to the held-out part by a hash of their path, so which text is held out
does not depend on which other files exist.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

_SKIPPED_FOLDERS = {"site-packages", "dist-packages", "test", "tests", "idle_test",
                    "__pycache__", "lib2to3"}
_MIN_CHARS, _MIN_WORDS = 60, 8
_HELD_OUT_EVERY = 20  # about one file in 20 is held out
_SPACES = re.compile(r"\s+")


@dataclasses.dataclass
class EnglishCorpus:
    train: list[str]  # paragraphs, one document each
    held_out: list[str]

    @property
    def chars(self) -> int:
        return sum(map(len, self.train)) + sum(map(len, self.held_out))


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The standard library's .py files in sorted order, without tests and vendored code."""
    root = root or stdlib_root()
    return sorted(p for p in root.rglob("*.py")
                  if not _SKIPPED_FOLDERS & set(p.relative_to(root).parts[:-1]))


def docstrings(source: bytes) -> Iterator[str]:
    """Every module, class and function docstring of one file, in source order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a file for another Python version: nothing to read
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node)
            if text:
                yield text


def prose_paragraphs(docstring: str) -> Iterator[str]:
    """The paragraphs of a docstring that read as sentences, each on one line."""
    for block in re.split(r"\n\s*\n", docstring):
        lines = [ln.strip() for ln in block.strip().splitlines()]
        if not lines or any(_code_like(ln) for ln in lines):
            continue
        text = _SPACES.sub(" ", " ".join(lines)).strip()
        if _is_prose(text):
            yield text


def _code_like(line: str) -> bool:
    return line.startswith((">>>", "...", "$ ", "|", "+-", "==", "--", "::", "..", "*", "-"))\
        or line.endswith("::") or "    " in line


def _is_prose(text: str) -> bool:
    if len(text) < _MIN_CHARS or len(text.split()) < _MIN_WORDS or not text[0].isupper():
        return False
    if not text.isascii() or text[-1] not in ".:!?":
        return False
    letters = sum(c.isalpha() or c in " ,.'" for c in text)
    return letters / len(text) >= 0.9


def build_english_corpus(max_chars: int | None = None, root: Path | None = None
                         ) -> EnglishCorpus:
    """Prose paragraphs of the stdlib's docstrings (at most about `max_chars` characters,
    taken in file order), split into training and held-out paragraphs by file."""
    root = root or stdlib_root()
    corpus, seen = EnglishCorpus([], []), set()
    for path in stdlib_sources(root):
        rel = path.relative_to(root).as_posix()
        held_out = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % _HELD_OUT_EVERY == 0
        for doc in docstrings(path.read_bytes()):
            for paragraph in prose_paragraphs(doc):
                if paragraph in seen:
                    continue
                seen.add(paragraph)
                (corpus.held_out if held_out else corpus.train).append(paragraph)
        if max_chars is not None and corpus.chars >= max_chars:
            break
    if not corpus.train or not corpus.held_out:
        raise RuntimeError(f"no English prose found in the docstrings under {root} "
                           f"({len(corpus.train)} train, {len(corpus.held_out)} held-out "
                           f"paragraphs)")
    return corpus


def write_english_corpus(corpus: EnglishCorpus, out_dir: Path) -> dict[str, Path]:
    """`train.jsonl` ({"text": ...} per paragraph, for tools/preprocess_data.py --mode text)
    and `held_out.txt` (one paragraph a line, for tools/eval_forgetting.py --text-file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"train": out_dir / "train.jsonl", "held_out": out_dir / "held_out.txt"}
    files["train"].write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus.train))
    files["held_out"].write_text("".join(t + "\n" for t in corpus.held_out))
    return files


def continuation_task(paragraphs: list[str], count: int, choices: int = 4,
                      seed: int = 0) -> list[dict]:
    """A multiple-choice test of English from held-out paragraphs, in HellaSwag's layout
    ({"ctx", "endings", "label"}): the first half of a paragraph, its own second half and the
    second halves of other paragraphs. A model that knows the language picks its own."""
    import numpy as np

    halves = [_halves(p) for p in paragraphs if 2 * _MIN_WORDS <= len(p.split()) <= 60]
    rng = np.random.default_rng(seed)
    picked = rng.permutation(len(halves))[:count]
    items = []
    for i in picked:
        others = rng.choice([j for j in range(len(halves)) if j != i], choices - 1,
                            replace=False)
        label = int(rng.integers(choices))
        endings = [halves[j][1] for j in others]
        endings.insert(label, halves[i][1])
        items.append({"ctx": halves[i][0], "endings": endings, "label": label})
    return items


def _halves(paragraph: str) -> tuple[str, str]:
    words = paragraph.split()
    cut = len(words) // 2
    return " ".join(words[:cut]), " ".join(words[cut:])
