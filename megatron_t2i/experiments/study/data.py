"""The mini-study's inputs: corpora, tokenizers and token files, built once and cached.

- Images: Fashion-MNIST mosaics with compositional captions (study/fashion.py), split by
  source item into train / valid / test files before anything is tokenized, so no document
  crosses splits and the split never depends on a training seed. The shapes corpus
  (data/synthetic.py) is the labelled positive control: captions fully decide its images.
- Image tokenizer: a small VQ autoencoder trained on the training split (tokenizers/vqvae.py),
  16x16 codes per image, and an 8x8 one for the codes-per-image ablation (same codebook size,
  so one grown LM serves both). The shapes control uses k-means patch codes.
- Text: the LM's English (study/english.py: WordNet glosses, fortunes, docstrings); the text
  tokenizer is trained on that text only, so caption words are ordinary trained ids. A
  word-shuffled copy of the same text trains the control LM.
- Token files: `<name>_train` and `<name>_valid` per corpus variant; the trainer reads the
  first with data.split "100,0,0" and the second whole (data.valid_data_path).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

CODEBOOK_SIZE = 256
TEXT_VOCAB_SIZE = 1024
CODES = (256, 64)  # codes per image: the study's tokenizer and the ratio ablation
PROMPTS = (  # greedy completions before and after image training (the paper's Table 1)
    "The meaning of the word",
    "A coat is a",
    "Happiness is",
    "A person who",
    "The sun is",
    "To be or not to be",
)
SHAPES_IMAGE_SIZE = 32
SHAPES_PATCH = {256: 2, 64: 4}  # k-means patch size for 16x16 and 8x8 codes on 32x32 shapes


@dataclasses.dataclass(frozen=True)
class DataScale:
    """The data side of a study mode (pipeline.Scale holds the training side)."""
    corpus: str  # "fashion" (the study) or "shapes" (the positive control)
    mosaics: dict[str, int]  # split -> documents
    english_chars: int | None
    vqvae_steps: int
    choice_items: int = 400


@dataclasses.dataclass(frozen=True)
class StudyData:
    root: Path
    text_tokenizer: Path
    image_tokenizers: dict[int, str]  # codes per image -> "kind:path"
    text_prefix: str  # the LM's English, text-only documents
    shuffled_prefix: str  # the same words shuffled within each document (control LM)
    held_out: Path  # held-out English, one document a line
    prompts: Path
    choice_task: Path  # WordNet definition -> word, 4 choices (HellaSwag layout)
    facts: dict[str, Any]

    def t2i(self, codes: int, split: str) -> str:
        return str(self.root / "tokens" / f"t2i_c{codes}_{split}")

    def uncond(self, split: str) -> str:
        return str(self.root / "tokens" / f"uncond_c{CODES[0]}_{split}")


def prepare_study_data(out: Path, scale: DataScale, seed: int = 1234) -> StudyData:
    """Build (or reuse, when built with the same parameters) everything under `out`."""
    params = {**dataclasses.asdict(scale), "seed": seed, "format": 2}
    data = _layout(out, scale)
    done = out / "params.json"
    if done.is_file() and json.loads(done.read_text()).get("params") == params:
        return dataclasses.replace(data, facts=json.loads(done.read_text())["facts"])
    facts: dict[str, Any] = {"corpus": scale.corpus}
    facts.update(_english(data, scale, seed))
    images, counts = _images(out / "images", scale, seed)
    facts.update(counts)
    facts["tokenizer"] = _image_tokenizers(data, images, scale, seed)
    facts.update(_token_files(data, out / "images"))
    facts["caption_words_in_lm_text"] = caption_word_counts(out / "images" / "train.jsonl",
                                                            out / "english" / "train.jsonl")
    done.write_text(json.dumps({"params": params, "facts": facts}, indent=1) + "\n")
    return dataclasses.replace(data, facts=facts)


def _layout(out: Path, scale: DataScale) -> StudyData:
    kind = "vqvae" if scale.corpus == "fashion" else "kmeans"
    suffix = ".safetensors" if kind == "vqvae" else ".npz"
    tok = out / "tokenizer"
    return StudyData(out, tok / "text.model",
                     {c: f"{kind}:{tok / f'image_c{c}{suffix}'}" for c in CODES},
                     str(out / "tokens" / "english_text"), str(out / "tokens" / "english_shuffled"),
                     out / "english" / "held_out.txt", out / "english" / "prompts.txt",
                     out / "english" / "wordnet_choice.jsonl", {})


# ---- text ---------------------------------------------------------------------------------

def _english(data: StudyData, scale: DataScale, seed: int) -> dict[str, Any]:
    from megatron_t2i.experiments.study import english
    from megatron_t2i.tokenizers.text import SentencePieceTokenizer

    corpus = english.build_english_corpus(scale.english_chars)
    files = english.write_english_corpus(corpus, data.root / "english")
    shuffled = data.root / "english" / "train_shuffled.jsonl"
    shuffled.write_text("".join(json.dumps({"text": english.shuffle_words(t, seed + i)}) + "\n"
                                for i, t in enumerate(corpus.train)))
    data.text_tokenizer.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = SentencePieceTokenizer.train(corpus.train, TEXT_VOCAB_SIZE,
                                             data.text_tokenizer.with_suffix(""))
    data.prompts.write_text("".join(p + "\n" for p in PROMPTS))
    items = english.wordnet_multiple_choice(scale.choice_items, seed)
    data.choice_task.write_text("".join(json.dumps(_hellaswag(i)) + "\n" for i in items))
    summaries = _preprocess({"english_text": (files["train"], "text"),
                             "english_shuffled": (shuffled, "text")}, data, None)
    train_ids = np.concatenate([tokenizer.encode(t) for t in corpus.train])
    held_ids = np.concatenate([tokenizer.encode(t) for t in corpus.held_out])
    return {"english_train_documents": len(corpus.train),
            "english_held_out_documents": len(corpus.held_out), "english_chars": corpus.chars,
            "english_text_tokens": summaries["english_text"].tokens,
            "choice_items": len(items),
            "unigram_held_out_ppl": float(english.unigram_perplexity(train_ids, held_ids,
                                                                     TEXT_VOCAB_SIZE))}


def _hellaswag(item: dict) -> dict:
    """A WordNet item as the forgetting evaluation's choice layout: the definition is the
    context, each candidate word an ending; the model's likelihood picks one."""
    return {"ctx": f"{item['definition'].rstrip('.')}. This is called", "endings":
            [f" {w}" if not w.startswith(" ") else w for w in item["choices"]],
            "label": int(item["answer"])}


def caption_word_counts(captions_jsonl: Path, english_jsonl: Path) -> dict[str, int]:
    """How often each caption word occurs in the LM's text (0: a word the LM never read)."""
    words = Counter(w for line in captions_jsonl.read_text().splitlines()
                    for w in _words(json.loads(line)["caption"]))
    text = Counter(w for line in english_jsonl.read_text().splitlines()
                   for w in _words(json.loads(line)["text"]))
    return {w: text.get(w, 0) for w in sorted(words)}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:-[a-z]+)?", text.lower())


# ---- images -------------------------------------------------------------------------------

def _images(folder: Path, scale: DataScale, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """`folder/{train,valid,test}.jsonl` + PNGs; returns the training images (for the image
    tokenizer) and the counts, with the documents shared between splits."""
    if scale.corpus == "fashion":
        from megatron_t2i.experiments.study import fashion

        counts = fashion.build_mosaic_corpus(folder, counts=scale.mosaics, seed=seed)
        duplicates = fashion.count_split_duplicates(folder)
    elif scale.corpus == "shapes":
        counts = _write_shapes(folder, scale.mosaics, seed)
        duplicates = shapes_split_duplicates(folder)
    else:
        raise ValueError(f"unknown study corpus {scale.corpus!r} (fashion or shapes)")
    from megatron_t2i.data.preprocess import collect_images

    size = 64 if scale.corpus == "fashion" else SHAPES_IMAGE_SIZE
    images = collect_images([str(folder / "train.jsonl")], size, scale.mosaics["train"])
    return images, {"documents": {s: scale.mosaics[s] for s in scale.mosaics},
                    "corpus_counts": counts, "split_duplicates": int(duplicates)}


def _write_shapes(folder: Path, counts: dict[str, int], seed: int) -> dict[str, int]:
    """The shapes control, split by document; a valid/test document identical to a training
    one (caption and pixels) is dropped, so the control does not leak either."""
    from PIL import Image

    from megatron_t2i.data import synthetic

    corpus = synthetic.generate(sum(counts.values()), SHAPES_IMAGE_SIZE, seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    start, written = 0, {}
    for split, n in counts.items():
        lines = []
        for i in range(start, start + n):
            key = _doc_key(corpus.images[i], corpus.captions[i])
            if split != "train" and key in seen:
                continue
            if split == "train":
                seen.add(key)
            name = f"images/{i:05d}.png"
            Image.fromarray(corpus.images[i]).save(folder / name)
            lines.append(json.dumps({"image": name, "caption": corpus.captions[i]}) + "\n")
        (folder / f"{split}.jsonl").write_text("".join(lines))
        written[split], start = len(lines), start + n
    return written


def _doc_key(image: np.ndarray, caption: str) -> str:
    return hashlib.sha1(image.tobytes() + caption.encode()).hexdigest()


def shapes_split_duplicates(folder: Path) -> int:
    """Documents of valid/test identical (caption and pixels) to a training document."""
    from PIL import Image

    keys: dict[str, set[str]] = {}
    for split in ("train", "valid", "test"):
        path = folder / f"{split}.jsonl"
        records = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
        keys[split] = {_doc_key(np.asarray(Image.open(folder / r["image"])), r["caption"])
                       for r in records}
    return len(keys["train"] & keys["valid"]) + len(keys["train"] & keys["test"])


def _image_tokenizers(data: StudyData, images: np.ndarray, scale: DataScale,
                      seed: int) -> dict[str, Any]:
    """Train (or fit) the image tokenizers on the training split; their quality on it."""
    from megatron_t2i.tokenizers.factory import load_image_tokenizer

    facts: dict[str, Any] = {}
    for codes, spec in data.image_tokenizers.items():
        kind, path = spec.split(":", 1)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        if kind == "vqvae":
            from megatron_t2i.tokenizers import vqvae

            model = vqvae.train_vqvae(images, codebook_size=CODEBOOK_SIZE,
                                      downsample=64 // int(round(codes ** 0.5)),
                                      steps=scale.vqvae_steps, batch_size=64, seed=seed)
            vqvae.save_vqvae(model, Path(path))
            tokenizer = load_image_tokenizer(kind, path)
            usage = vqvae.codebook_usage(tokenizer, images[:512])
            facts[f"c{codes}"] = {
                "reconstruction_mse": float(vqvae.reconstruction_mse(tokenizer, images[:512])),
                "codebook_perplexity": float(usage["perplexity"]),
                "dead_codes": int(usage["dead_codes"]), "used": int(usage["used"])}
        else:
            from megatron_t2i.tokenizers.kmeans import KMeansPatchVQ

            vq = KMeansPatchVQ.fit(images, CODEBOOK_SIZE, SHAPES_PATCH[codes], seed)
            vq.save(Path(path))
            facts[f"c{codes}"] = _kmeans_quality(vq, images[:512])
    return facts


def _kmeans_quality(vq, images: np.ndarray) -> dict[str, Any]:
    codes = np.asarray(vq.encode(images))
    recon = np.asarray(vq.decode(codes), dtype=np.float64)
    counts = np.bincount(codes.reshape(-1), minlength=CODEBOOK_SIZE).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return {"reconstruction_mse": float(((recon / 255 - images / 255) ** 2).mean()),
            "codebook_perplexity": float(np.exp(-(p * np.log(p)).sum())),
            "dead_codes": int((counts == 0).sum()), "used": int((counts > 0).sum())}


# ---- token files --------------------------------------------------------------------------

def _token_files(data: StudyData, images: Path) -> dict[str, Any]:
    jobs: dict[str, tuple[Path, str, str | None]] = {}
    for split in ("train", "valid"):
        for codes in CODES:
            jobs[f"t2i_c{codes}_{split}"] = (images / f"{split}.jsonl", "conditional", codes)
        jobs[f"uncond_c{CODES[0]}_{split}"] = (images / f"{split}.jsonl", "unconditional",
                                               CODES[0])
    summaries = _preprocess(jobs, data, data.image_tokenizers)
    train = summaries[f"t2i_c{CODES[0]}_train"]
    caption = (train.tokens - train.documents * (CODES[0] + 3)) / train.documents  # - specials
    return {"token_files": {k: {"documents": s.documents, "tokens": s.tokens}
                            for k, s in summaries.items()},
            "mean_caption_tokens": round(caption, 1),
            "image_to_text_targets": round(CODES[0] / max(caption, 1e-9), 1)}


def _preprocess(jobs: dict, data: StudyData, image_specs: dict[int, str] | None) -> dict:
    from megatron_t2i.data.preprocess import Settings, preprocess

    text = ("sentencepiece", str(data.text_tokenizer))
    out = {}
    (data.root / "tokens").mkdir(parents=True, exist_ok=True)
    for name, (path, mode, *codes) in jobs.items():
        prefix = str(data.root / "tokens" / name)
        if mode == "text":
            settings = Settings((str(path),), prefix, "text", text, image_vocab_size=0,
                                progress=False)
        else:
            kind, spec = image_specs[codes[0]].split(":", 1)
            settings = Settings((str(path),), prefix, mode, text, image_tokenizer=(kind, spec),
                                progress=False)
        out[name] = preprocess(settings)
    return out
