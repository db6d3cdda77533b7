"""CLIP score: how well generated images agree with their captions (Hessel et al. 2021).

    CLIP score = mean over (image, caption) pairs of 100 * max(cos(E_image, E_text), 0)

with E the projected CLIP embeddings (the definition torchmetrics' CLIPScore and the anchors
LlamaGen and Liquid report next to FID). The model is a Hugging Face `transformers` CLIPModel
and its CLIPProcessor (resize, centre crop, normalise; tokenise, truncated to the model's
context) read from a local folder: nothing is downloaded. Numbers are comparable only between
runs with the same CLIP checkpoint (the anchors use OpenAI's ViT-L/14 or ViT-B/32).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def load_clip(folder: str | Path) -> tuple[Any, Any]:
    """CLIPModel and CLIPProcessor from a local checkpoint folder (config.json,
    model.safetensors, the tokenizer and processor files)."""
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"CLIP model {folder}: not a folder with a config.json (give a "
                                f"local transformers CLIP checkpoint, e.g. a saved "
                                f"openai/clip-vit-large-patch14)")
    try:  # safetensors only: a pickled pytorch_model.bin could run code on load
        model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except OSError as e:  # transformers' "no file named ..." for an incomplete folder
        raise ValueError(f"CLIP model {folder}: {str(e).splitlines()[0]}") from e
    return model.eval(), processor


def clip_scores(images: np.ndarray, captions: Sequence[str], model: Any, processor: Any,
                batch_size: int = 32, device: str | torch.device = "cpu") -> np.ndarray:
    """100 * max(cos, 0) for each uint8 image [n, h, w, 3] and its caption."""
    if len(images) != len(captions) or len(images) == 0:
        raise ValueError(f"CLIP score: {len(images)} images for {len(captions)} captions")
    model = model.to(device)
    out = []
    for s in range(0, len(images), batch_size):
        inputs = processor(text=list(captions[s:s + batch_size]),
                           images=list(images[s:s + batch_size]), return_tensors="pt",
                           padding=True, truncation=True)
        with torch.no_grad():
            result = model(**{k: v.to(device) for k, v in inputs.items()})
        # CLIPModel's forward returns both embeddings projected and L2-normalised
        cosine = (result.image_embeds * result.text_embeds).sum(-1)
        out.append((100 * cosine.clamp(min=0)).float().cpu().numpy())
    return np.concatenate(out)


def clip_score(images: np.ndarray, captions: Sequence[str], model: Any, processor: Any,
               batch_size: int = 32, device: str | torch.device = "cpu") -> float:
    """The mean CLIP score over (image, caption) pairs."""
    return float(clip_scores(images, captions, model, processor, batch_size, device).mean())


def read_captions(source: str | Path, captions_file: str | Path | None,
                  count: int) -> list[str]:
    """The captions of a generated set: `captions_file` (one per line) when given, else the
    `captions` array of the .npz that tools/generate_images.py writes."""
    if captions_file is not None:
        lines = Path(captions_file).read_text(encoding="utf-8").splitlines()
        captions = [ln.strip() for ln in lines if ln.strip()]
    elif Path(source).suffix == ".npz":
        with np.load(source, allow_pickle=False) as f:
            if "captions" not in f:
                raise KeyError(f"{source}: no 'captions' array for the CLIP score (has "
                               f"{list(f.keys())}); give --captions-file")
            captions = [str(c) for c in f["captions"]]
    else:
        raise ValueError(f"{source}: a folder of images carries no captions; give "
                         f"--captions-file for the CLIP score")
    if len(captions) != count:
        raise ValueError(f"CLIP score: {count} generated images but {len(captions)} captions "
                         f"in {captions_file or source}")
    return captions
