"""The LM's English: WordNet glosses, fortunes and docstrings; the multiple-choice test, the
word-shuffled control and the unigram floor of the quality gate."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pytest

from megatron_t2i.experiments.study import english
from megatron_t2i.experiments.study.debian import MissingData


@pytest.fixture(scope="module")
def corpus() -> english.EnglishCorpus:
    try:
        return english.build_english_corpus(max_chars=150_000)
    except MissingData as e:  # not root and no package: nothing to test against
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def items(corpus) -> list[dict]:
    return english.wordnet_multiple_choice(400, seed=5)


def _words(texts: list[str]) -> Counter:
    return Counter(w for t in texts for w in re.findall(r"[a-z]+(?:-[a-z]+)?", t.lower()))


def test_wordnet_is_read_whole(corpus):
    synsets = english.wordnet_synsets()
    assert len(synsets) == 117659  # WordNet 3.0's synsets, all four parts of speech
    sneaker = next(x for x in synsets if "sneaker" in x.words and x.pos == "n")
    assert sneaker.text == "Gym shoe, sneaker, tennis shoe: a canvas shoe with a pliable " \
                           "rubber sole."
    trouser = next(x for x in synsets if x.words == ("trouser",))
    assert trouser.definition == "a garment (or part of a garment) designed for or relating " \
                                 "to trousers"


def test_corpus_mixes_three_sources_and_is_deterministic(corpus):
    # (determinism of the whole build: tests/test_mini_study.py builds it twice)
    assert set(corpus.sources) == {"wordnet", "fortunes", "docstrings"}
    for name, share in english.SHARES.items():
        assert corpus.sources[name] >= 0.9 * share * 150_000
    assert corpus.held_out and not set(corpus.train) & set(corpus.held_out)
    assert any(t.startswith("Gym shoe, sneaker") or ": a " in t for t in corpus.train)
    for text in corpus.train + corpus.held_out:
        assert "\n" not in text and text.isascii() and text[0].isupper()


def test_caption_class_words_are_in_the_training_text(corpus):
    counts = _words(corpus.train)
    for word in sorted(english.CLASS_WORDS) + ["top", "bottom", "left", "right"]:
        assert counts[word] > 0, word  # an ordinary word the LM has read


def test_fortunes_are_prose_without_attributions(corpus, tmp_path):
    docs = english.fortune_documents()  # the package's files
    assert len(docs) > 2000
    held = sum(d.held_out for d in docs) / len(docs)
    assert 0.02 < held < 0.09  # about one in twenty
    (tmp_path / "quotes").write_text(
        "The best way to predict the future is\nto invent it, said someone once.\n"
        "\t\t-- Alan Kay\n%\n"
        "  /\\_/\\\n ( o.o )\n  > ^ <\n%\n"
        "Too short.\n%\n"
        "Never put off till tomorrow what you can do the day after tomorrow.\n")
    (tmp_path / "quotes.dat").write_bytes(b"\0" * 24)  # the index beside it: not text
    texts = [d.text for d in english.fortune_documents(tmp_path)]
    assert texts == ["The best way to predict the future is to invent it, said someone once.",
                     "Never put off till tomorrow what you can do the day after tomorrow."]


def test_multiple_choice_items_come_from_held_out_synsets(items):
    assert len(items) == 400
    assert items == english.wordnet_multiple_choice(400, seed=5)
    assert items != english.wordnet_multiple_choice(400, seed=6)
    held = {x.definition: x for x in english.held_out_synsets()}
    answers = Counter(i["answer"] for i in items)
    assert set(answers) == {0, 1, 2, 3} and min(answers.values()) > 60  # no position bias
    for item in items:
        choices = item["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4
        synset = held[item["definition"]]  # held out: its gloss is not in the LM's text
        assert choices[item["answer"]] in synset.words
        assert choices[item["answer"]] not in item["definition"].lower()
        assert not set(choices) - {choices[item["answer"]]} & set(synset.words)


def test_multiple_choice_excludes_words():
    excluded = {"coat", "dress", "bag", "boot", "shirt"}
    items = english.wordnet_multiple_choice(400, seed=0, exclude=excluded)
    assert not {w for i in items for w in i["choices"]} & excluded


def test_shuffle_words_keeps_words_and_loses_order():
    text = "the quick brown fox jumps over the lazy dog and runs far away from here"
    shuffled = english.shuffle_words(text, seed=1)
    assert sorted(shuffled.split()) == sorted(text.split()) and shuffled != text
    assert english.shuffle_words(text, seed=1) == shuffled
    assert english.shuffle_words(text, seed=2) != shuffled


def test_unigram_perplexity_of_an_add_one_model():
    # counts [2, 1, 0] + 1 over 3 + 3: p = [1/2, 1/3, 1/6]
    assert english.unigram_perplexity([0, 0, 1], [0, 1], 3) == pytest.approx(math.sqrt(6))
    assert english.unigram_perplexity([], [0, 1, 2], 3) == pytest.approx(3.0)  # uniform
    ids = np.random.default_rng(0).integers(0, 50, 5000)
    assert english.unigram_perplexity(ids, ids[:500], 50) <= 50
    with pytest.raises(ValueError, match="exceed vocab_size"):
        english.unigram_perplexity([0, 7], [0], 5)
