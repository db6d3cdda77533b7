"""The mini-study's inputs: one text tokenizer, one image tokenizer, three sets of token files.

The pretrained LM and the text-to-image runs must share the text tokenizer, as OpenLM-1B and
the paper's captions share GPT-NeoX's. So one sentencepiece model is trained on the English
prose *and* the captions; the LM's text-only files are written with zero image codes in their
layout, and the image-caption files with the image codebook, whose layout is exactly what
vocabulary surgery makes of the LM's (text ids, then image codes, then `<boi>`, `<eoi>`).

The images and captions are the demo's synthetic corpus (data/synthetic.py), written out as
PNG files and a jsonl so they go through the same preprocessing as any real corpus
(data/preprocess.py): `conditional` for text-to-image, `unconditional` for image-only
documents, `text` for the English prose.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from megatron_t2i.study.english import (
    EnglishCorpus,
    build_english_corpus,
    continuation_task,
    write_english_corpus,
)

IMAGE_SIZE, PATCH_SIZE, CODEBOOK_SIZE = 32, 4, 256  # 64 codes per image, as the demo
# Prompts for the greedy completions before and after image training (the paper's Table 1
# asks about relativity and French; this LM has read docstrings).
PROMPTS = (
    "Return a new list containing",
    "If the file does not exist,",
    "This module provides functions for",
    "Raise ValueError if the",
    "The default value of the timeout is",
    "Return True if the string",
)


@dataclasses.dataclass(frozen=True)
class StudyData:
    text_tokenizer: Path  # sentencepiece .model shared by every run
    image_tokenizer: Path  # k-means patch VQ .npz
    text_prefix: str  # English prose, text-only documents (layout without image codes)
    t2i_prefix: str  # [bos] caption [boi] codes [eoi]
    uncond_prefix: str  # [bos] [boi] codes [eoi]
    held_out: Path  # held-out English, one paragraph a line
    prompts: Path  # one prompt a line
    choice_task: Path  # held-out continuation choice, HellaSwag layout
    facts: dict[str, Any]  # sizes for the report


def prepare_study_data(out: Path, english_chars: int | None, pairs: int, text_vocab_size: int,
                       seed: int = 1234) -> StudyData:
    """Build (or reuse, when built with the same parameters) everything under `out`."""
    params = {"english_chars": english_chars, "pairs": pairs, "seed": seed,
              "text_vocab_size": text_vocab_size, "format": 1}
    data = _study_data(out)
    done = out / "params.json"
    if done.is_file() and json.loads(done.read_text()).get("params") == params:
        return dataclasses.replace(data, facts=json.loads(done.read_text())["facts"])
    english = build_english_corpus(english_chars)
    files = write_english_corpus(english, out / "english")
    captions = _write_pairs(out / "pairs", pairs, seed)
    _fit_tokenizers(data, english, captions, text_vocab_size, out / "pairs", seed)
    summaries = _preprocess_all(data, files["train"], out / "pairs" / "pairs.jsonl")
    data.prompts.write_text("".join(p + "\n" for p in PROMPTS))
    task = continuation_task(english.held_out, count=100, seed=seed)
    data.choice_task.write_text("".join(json.dumps(t) + "\n" for t in task))
    facts = {"english_train_paragraphs": len(english.train),
             "english_held_out_paragraphs": len(english.held_out),
             "english_chars": english.chars, "pairs": pairs, "choice_items": len(task),
             **{f"{k}_tokens": s.tokens for k, s in summaries.items()},
             **{f"{k}_documents": s.documents for k, s in summaries.items()}}
    done.write_text(json.dumps({"params": params, "facts": facts}, indent=2) + "\n")
    return dataclasses.replace(data, facts=facts)


def _study_data(out: Path) -> StudyData:
    tokens = out / "tokens"
    return StudyData(out / "tokenizer" / "text.model", out / "tokenizer" / "image_vq.npz",
                     str(tokens / "english_text"), str(tokens / "pairs_t2i"),
                     str(tokens / "pairs_uncond"), out / "english" / "held_out.txt",
                     out / "english" / "prompts.txt", out / "english" / "continuation.jsonl",
                     {})


def _write_pairs(folder: Path, count: int, seed: int) -> list[str]:
    """The synthetic corpus as `images/NNNNN.png` + `pairs.jsonl`; returns the captions."""
    from PIL import Image

    from megatron_t2i.data import synthetic

    corpus = synthetic.generate(count, IMAGE_SIZE, seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, text) in enumerate(zip(corpus.images, corpus.captions)):
        name = f"images/{i:05d}.png"
        Image.fromarray(image).save(folder / name)
        lines.append(json.dumps({"image": name, "caption": text}) + "\n")
    (folder / "pairs.jsonl").write_text("".join(lines))
    return corpus.captions


def _fit_tokenizers(data: StudyData, english: EnglishCorpus, captions: list[str],
                    text_vocab_size: int, pairs: Path, seed: int) -> None:
    from megatron_t2i.data.preprocess import collect_images
    from megatron_t2i.tokenizers.kmeans import KMeansPatchVQ
    from megatron_t2i.tokenizers.text import SentencePieceTokenizer

    SentencePieceTokenizer.train([*english.train, *captions], text_vocab_size,
                                 data.text_tokenizer.with_suffix(""))
    images = collect_images([str(pairs / "pairs.jsonl")], IMAGE_SIZE, len(captions))
    KMeansPatchVQ.fit(images, CODEBOOK_SIZE, PATCH_SIZE, seed).save(data.image_tokenizer)


def _preprocess_all(data: StudyData, english_jsonl: Path, pairs_jsonl: Path) -> dict:
    from megatron_t2i.data.preprocess import Settings, preprocess

    text = ("sentencepiece", str(data.text_tokenizer))
    image = ("kmeans", str(data.image_tokenizer))
    jobs = {"english_text": Settings((str(english_jsonl),), data.text_prefix, "text", text,
                                     image_vocab_size=0, progress=False),
            "pairs_t2i": Settings((str(pairs_jsonl),), data.t2i_prefix, "conditional", text,
                                  image_tokenizer=image, progress=False),
            "pairs_uncond": Settings((str(pairs_jsonl),), data.uncond_prefix, "unconditional",
                                     text, image_tokenizer=image, progress=False)}
    return {name: preprocess(settings) for name, settings in jobs.items()}
