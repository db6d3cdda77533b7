"""Real English text available offline: WordNet 3.0's glosses, fortunes and the docstrings of
Python's standard library.

    from megatron_t2i.experiments.study import english
    corpus = english.build_english_corpus(max_chars=300_000)  # .train / .held_out paragraphs
    english.write_english_corpus(corpus, out)       # train.jsonl, held_out.txt
    english.shuffle_words(text, seed)               # the word-shuffled control LM's text
    items = english.wordnet_multiple_choice(400, seed=0)  # definition -> one of 4 words
    english.unigram_perplexity(train_ids, held_out_ids, vocab_size)  # the quality gate's floor

The mini-study pretrains its small language model on this prose, so that "pretrained" means
something: a model that has learnt English word statistics the captions can draw on, and that
can forget them. Three sources, each cut into documents and split into training and held-out
parts by a hash of something stable (so which text is held out does not depend on what else
exists):

- WordNet 3.0 (Debian `wordnet-base`, installed with apt-get when missing and run as root):
  every synset as "Sneaker, gym shoe, tennis shoe: a canvas shoe with a pliable rubber sole.",
  eight consecutive synsets of a data file to a document, held out by the first synset's
  offset. Documents naming a caption word (the Fashion-MNIST class words, `CAPTION_WORDS`)
  always go to training, so the caption words are ordinary words the LM has read.
- fortunes (Debian `fortunes`, likewise): quotations and jokes that read as prose, held out by
  a hash of the text.
- docstrings: read with `ast` from the stdlib's source files (no module is imported, so
  nothing runs), in sorted path order, and cut into prose paragraphs: code examples (`>>>`),
  tables, option lists and other lines that are not sentences are dropped, repeated paragraphs
  kept once; held out by a hash of the file's path.

With `max_chars`, each source gives its share (`SHARES`): WordNet and fortunes documents in a
fixed hashed order (pinned, caption-word documents first), docstrings in file order. The same
packages and Python installation give the same corpus byte for byte.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import re
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from megatron_t2i.experiments.study.debian import ensure_debian_data
from megatron_t2i.experiments.study.fashion import CLASS_NAMES

_SKIPPED_FOLDERS = {"site-packages", "dist-packages", "test", "tests", "idle_test",
                    "__pycache__", "lib2to3"}
_MIN_CHARS, _MIN_WORDS = 60, 8
_HELD_OUT_EVERY = 20  # about one file in 20 is held out
_SPACES = re.compile(r"\s+")
_WORDNET = Path("/usr/share/wordnet")
_WORDNET_POS = ("noun", "verb", "adj", "adv")
_SYNSETS_PER_DOC = 8
_FORTUNES = Path("/usr/share/games/fortunes")
_FORTUNE_SKIP = {"art", "ascii-art", "translate-me"}  # pictures and non-English text
SHARES = {"wordnet": 0.4, "fortunes": 0.3, "docstrings": 0.3}  # of max_chars
# the class words of the mosaic captions ("a sandal at the top left and ..."): WordNet
# documents naming them are always trained (positions and function words are common anyway)
CLASS_WORDS = frozenset(w for name in CLASS_NAMES for w in name.split()[1:]) - {"pair", "of"}


@dataclasses.dataclass
class EnglishCorpus:
    train: list[str]  # paragraphs, one document each
    held_out: list[str]
    sources: dict[str, int] = dataclasses.field(default_factory=dict)  # name -> characters

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


def build_english_corpus(max_chars: int | None = None, root: Path | None = None,
                         pinned: Iterable[str] | None = None) -> EnglishCorpus:
    """WordNet glosses, fortunes and stdlib docstring paragraphs (at most about `max_chars`
    characters, each source its `SHARES` part), split into training and held-out documents.
    WordNet documents naming a `pinned` word (default: the caption's class words) are
    always trained."""
    pinned = set(CLASS_WORDS if pinned is None else pinned)
    sources = {"wordnet": wordnet_documents(pinned), "fortunes": fortune_documents(),
               "docstrings": docstring_documents(root)}  # read lazily, in file order
    corpus = EnglishCorpus([], [])
    for name, docs in sources.items():
        budget = None if max_chars is None else int(max_chars * SHARES[name])
        if budget is not None and name != "docstrings":  # a fixed hashed order, so a cap
            docs = sorted(docs, key=lambda d: (not d.pinned, _hash(d.key)))  # takes a spread
        taken = 0
        for doc in docs:
            if budget is not None and taken >= budget:
                break
            (corpus.held_out if doc.held_out else corpus.train).append(doc.text)
            taken += len(doc.text)
        corpus.sources[name] = taken
    if not corpus.train or not corpus.held_out:
        raise RuntimeError(f"no English prose found ({len(corpus.train)} train, "
                           f"{len(corpus.held_out)} held-out documents)")
    return corpus


@dataclasses.dataclass(frozen=True)
class _Document:
    text: str
    key: str  # what its held-out draw and its place in a capped corpus hash
    held_out: bool
    pinned: bool = False


def _hash(key: str) -> int:
    return int(hashlib.sha1(key.encode()).hexdigest(), 16)


def _is_held_out(key: str) -> bool:
    return _hash(key) % _HELD_OUT_EVERY == 0


def docstring_documents(root: Path | None = None) -> Iterator[_Document]:
    """Prose paragraphs of the stdlib's docstrings, held out by file."""
    root = root or stdlib_root()
    seen: set[str] = set()
    for path in stdlib_sources(root):
        rel = path.relative_to(root).as_posix()
        held_out = _is_held_out(rel)
        for doc in docstrings(path.read_bytes()):
            for paragraph in prose_paragraphs(doc):
                if paragraph not in seen:
                    seen.add(paragraph)
                    yield _Document(paragraph, f"{rel}:{len(seen)}", held_out)


# ---- WordNet ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Synset:
    offset: str
    pos: str  # n, v, a, r (s: satellite adjective)
    words: tuple[str, ...]  # lemmas, underscores as spaces
    gloss: str  # definition; examples in quotes

    @property
    def definition(self) -> str:
        return self.gloss.split('; "')[0].split(' "')[0].strip().rstrip(";")

    @property
    def text(self) -> str:
        names = ", ".join(dict.fromkeys(self.words))
        return f"{names[0].upper()}{names[1:]}: {self.gloss.rstrip('.; ')}."


def wordnet_folder() -> Path:
    for pos in _WORDNET_POS:
        ensure_debian_data("wordnet-base", _WORDNET / f"data.{pos}")
    return _WORDNET


def wordnet_synsets(folder: Path | None = None) -> list[Synset]:
    """Every synset of WordNet 3.0's data files (noun, verb, adj, adv), in file order."""
    return list(_read_synsets(folder or wordnet_folder()))


@functools.lru_cache(maxsize=2)
def _read_synsets(folder: Path) -> tuple[Synset, ...]:
    synsets = []
    for pos in _WORDNET_POS:
        with open(folder / f"data.{pos}", encoding="latin-1") as f:
            for line in f:
                if line.startswith("  ") or " | " not in line:  # the licence header
                    continue
                head, gloss = line.split(" | ", 1)
                fields = head.split()
                count = int(fields[3], 16)
                words = tuple(re.sub(r"\(\w+\)$", "", w).replace("_", " ")
                              for w in fields[4:4 + 2 * count:2])
                synsets.append(Synset(fields[0], fields[2], words, gloss.strip()))
    return tuple(synsets)


def _wordnet_groups(synsets: list[Synset], pinned: set[str]
                    ) -> Iterator[tuple[list[Synset], str, bool, bool]]:
    """(synsets, key, held out, pinned) per document: `_SYNSETS_PER_DOC` consecutive ones."""
    for s in range(0, len(synsets), _SYNSETS_PER_DOC):
        group = synsets[s:s + _SYNSETS_PER_DOC]
        key = f"wordnet:{group[0].pos}:{group[0].offset}"
        pin = any(w.lower() in pinned or f"{w.lower()}s" in pinned  # trouser(s)
                  for x in group for w in x.words)
        yield group, key, _is_held_out(key) and not pin, pin


def wordnet_documents(pinned: set[str], folder: Path | None = None) -> list[_Document]:
    docs = []
    for group, key, held_out, pin in _wordnet_groups(wordnet_synsets(folder), pinned):
        text = " ".join(x.text for x in group if x.text.isascii())
        if text:
            docs.append(_Document(text, key, held_out, pin))
    return docs


def held_out_synsets(pinned: set[str] = CLASS_WORDS, folder: Path | None = None
                     ) -> list[Synset]:
    """The synsets of held-out WordNet documents: what the multiple-choice test draws on."""
    return [x for group, _, held_out, _ in _wordnet_groups(wordnet_synsets(folder), pinned)
            if held_out for x in group]


def wordnet_multiple_choice(count: int, seed: int = 0, exclude: Iterable[str] = ()
                            ) -> list[dict[str, Any]]:
    """`count` items {"definition", "choices" (4 words), "answer" (index)}: a held-out
    synset's definition, one of its single-word lemmas (not a word of the definition) and three
    words of the same part of speech from other synsets. Words in `exclude` are neither answers nor distractors."""
    import numpy as np

    excluded = {w.lower() for w in exclude}
    all_synsets = wordnet_synsets()

    def usable(w: str) -> bool:
        return w.isalpha() and w.islower() and len(w) >= 3 and w not in excluded

    by_pos: dict[str, list[str]] = {}
    for x in all_synsets:
        by_pos.setdefault(x.pos.replace("s", "a"), []).extend(w for w in x.words if usable(w))
    pools = {pos: sorted(set(words)) for pos, words in by_pos.items()}
    candidates = [x for x in held_out_synsets() if len(x.definition.split()) >= 3
                  and any(usable(w) and w not in x.definition.lower() for w in x.words)]
    rng = np.random.default_rng(seed)
    items = []
    for i in rng.permutation(len(candidates)):
        x = candidates[int(i)]
        answer = next(w for w in x.words if usable(w) and w not in x.definition.lower())
        pool = pools[x.pos.replace("s", "a")]
        own = {w.lower() for w in x.words}
        distractors: list[str] = []
        while len(distractors) < 3:
            w = pool[int(rng.integers(len(pool)))]
            if w not in own and w not in distractors:
                distractors.append(w)
        label = int(rng.integers(4))
        items.append({"definition": x.definition, "choices": distractors[:label] + [answer] +
                      distractors[label:], "answer": label})
        if len(items) == count:
            return items
    raise ValueError(f"wordnet_multiple_choice: only {len(items)} usable held-out synsets "
                     f"for {count} items")


# ---- fortunes -----------------------------------------------------------------------------

def fortunes_folder() -> Path:
    return ensure_debian_data("fortunes", _FORTUNES / "fortunes").parent


def fortune_documents(folder: Path | None = None) -> list[_Document]:
    """Fortunes that read as prose, one a document, held out by a hash of the text."""
    folder = folder or fortunes_folder()
    docs, seen = [], set()
    for path in sorted(folder.iterdir()):
        if path.suffix or not path.is_file() or path.name in _FORTUNE_SKIP:
            continue
        raw = path.read_bytes().decode("utf-8", errors="replace")
        for entry in re.split(r"\n%\n", raw):
            text = _fortune_prose(entry)
            if text and text not in seen:
                seen.add(text)
                docs.append(_Document(text, f"fortune:{text}", _is_held_out(text)))
    return docs


def _fortune_prose(entry: str) -> str | None:
    lines = [ln.strip() for ln in entry.strip().splitlines()]
    lines = [ln for ln in lines if not ln.startswith("--")]  # attributions
    if not lines or any(_code_like(ln) or ln.startswith((" ", "\t")) for ln in lines):
        return None
    text = _SPACES.sub(" ", " ".join(lines)).strip()
    if len(text) < 40 or len(text.split()) < _MIN_WORDS or not text.isascii():
        return None
    if not text[0].isupper() or text[-1] not in ".!?\"'":
        return None
    letters = sum(c.isalpha() or c in " ,.'\"?!;:-" for c in text)
    return text if letters / len(text) >= 0.95 else None


# ---- controls and the quality gate --------------------------------------------------------

def shuffle_words(text: str, seed: int) -> str:
    """The same words in a random order: the text of the word-shuffled control LM (its unigram
    statistics are English, its order is not)."""
    import numpy as np

    words = text.split()
    order = np.random.default_rng(seed).permutation(len(words))
    return " ".join(words[i] for i in order)


def unigram_perplexity(train_ids: Sequence[int], heldout_ids: Sequence[int],
                       vocab_size: int) -> float:
    """Held-out perplexity of an add-one smoothed unigram model of the training ids: the
    floor an LM must beat to have learnt anything about word order."""
    import numpy as np

    counts = np.bincount(np.asarray(train_ids, dtype=np.int64), minlength=vocab_size)
    if len(counts) > vocab_size:
        raise ValueError(f"unigram_perplexity: ids up to {len(counts) - 1} exceed "
                         f"vocab_size={vocab_size}")
    logp = np.log((counts + 1.0) / (counts.sum() + vocab_size))
    held = np.asarray(heldout_ids, dtype=np.int64)
    if held.size == 0:
        raise ValueError("unigram_perplexity: no held-out ids")
    return float(np.exp(-logp[held].mean()))


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
