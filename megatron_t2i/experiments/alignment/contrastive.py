"""Contrastive alignment: image-code embeddings learned in a pretrained LM's text space.

The paper's attempt to give image tokens a meaning the language model already knows: before
text-to-image training, learn one embedding per image code such that an image (the mean of its
codes' embeddings) lands near its caption (the mean of the caption tokens' *frozen* embeddings
from the LM's input table), with CLIP's symmetric contrastive loss over a batch of pairs and a
learnable temperature. Nothing projects either side: the image rows live in the text table's
space and can initialise the image rows of the grown vocabulary (tools/resize_vocab.py
--init file). The paper saw the loss plateau at once and the codes' nearest text tokens be
noisy and meaningless; `nearest_text_tokens` is there to look.

    table = load_text_embeddings("ckpt/openlm_1b")           # [text_size, hidden], frozen
    pairs = read_pairs("data/coco_tokens")                    # [bos] caption [boi] codes [eoi]
    result = align(table, pairs, AlignConfig(steps=2000), out_dir="runs/align")

Inputs
  text embeddings  a trainer checkpoint (root or iter_N folder: `embedding.word_embeddings.
                   weight`, rows [0, text_size) of the layout in its meta.json), or a
                   .safetensors / .pt file holding one 2-D tensor (or name it); rows beyond the
                   data's text vocabulary are ignored.
  pairs            megatron indexed token files with their vocabulary sidecar; documents
                   without `<boi>` or with an empty caption are skipped.

Outputs (in out_dir)
  alignment_metrics.jsonl   one line per step: step, loss, temperature, logit_scale, lr
  image_rows.safetensors    tensor `word_embeddings`, float32 [image_size, hidden]: row c is
                            image code c (token id text_size + c of the layout); the format
                            tools/resize_vocab.py --init file reads. Metadata (strings):
                            format, text_size, image_size, hidden, steps, final_loss.
  nearest_text_tokens.json  per image code the top-k text tokens by cosine similarity (ids and,
                            with a text tokenizer, strings), and a summary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from megatron_t2i.vocab import VocabLayout

ROWS_FILE = "image_rows.safetensors"
ROWS_TENSOR = "word_embeddings"  # the name resize_vocab's `--init file` reads
METRICS_FILE = "alignment_metrics.jsonl"
NEAREST_FILE = "nearest_text_tokens.json"


class AlignmentError(ValueError):
    """Inputs the alignment cannot use; the message names the file and what is wrong."""


@dataclasses.dataclass
class AlignConfig:
    steps: int = 1000
    batch_size: int = 256  # image-caption pairs per step; the other pairs are the negatives
    lr: float = 1e-3
    weight_decay: float = 0.0
    init_temperature: float = 0.07  # CLIP's
    max_logit_scale: float = 100.0  # CLIP clamps exp(logit_scale) at 100
    # image rows start at N(mean of the text rows, std); None: the text table's std, so both
    # sides start on the same scale
    init_std: float | None = None
    seed: int = 0
    log_interval: int = 50
    top_k: int = 10
    device: str = "cpu"


@dataclasses.dataclass
class Pairs:
    """Image-caption pairs as padded arrays."""

    captions: torch.Tensor  # int64 [N, max caption length], text ids, 0 where masked
    caption_mask: torch.Tensor  # bool [N, max caption length]
    codes: torch.Tensor  # int64 [N, codes per image], image codes in [0, image_size)
    layout: VocabLayout

    def __len__(self) -> int:
        return self.codes.shape[0]


# ---- inputs ---------------------------------------------------------------------------------

def load_text_embeddings(path: str | Path, tensor_name: str | None = None) -> torch.Tensor:
    """The frozen text table [rows, hidden] (float32) from a checkpoint or a tensor file."""
    path = Path(path)
    if not path.exists():
        raise AlignmentError(f"text embeddings {path}: no such file or folder")
    if path.is_dir():
        table = _table_from_checkpoint(path)
    else:
        table = _table_from_file(path, tensor_name)
    if table.dim() != 2 or not table.is_floating_point():
        raise AlignmentError(f"text embeddings {path}: expected a 2-D float table "
                             f"[text vocabulary, hidden], got {tuple(table.shape)} {table.dtype}")
    return table.float()


def _table_from_checkpoint(path: Path) -> torch.Tensor:
    from megatron_t2i.checkpoint.io import CheckpointReader
    from megatron_t2i.checkpoint.layout import CheckpointError
    from megatron_t2i.model.keys import vocab_table_keys

    try:
        reader = CheckpointReader(path)
        table = reader.read(vocab_table_keys()[0])
    except CheckpointError as e:
        raise AlignmentError(f"text embeddings: {e}") from None
    if "vocab" in reader.meta:  # only the text rows: image rows and padding are not text
        table = table[:VocabLayout.from_dict(reader.meta["vocab"]).text_size]
    return table


def _table_from_file(path: Path, tensor_name: str | None) -> torch.Tensor:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors: Any = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign or truncated file
        raise AlignmentError(f"text embeddings {path}: not a safetensors or torch tensor file "
                             f"({e})") from None
    if isinstance(tensors, torch.Tensor):
        return tensors
    if not isinstance(tensors, dict) or not tensors:
        raise AlignmentError(f"text embeddings {path}: expected a tensor or a dict of tensors")
    if tensor_name is None:
        if len(tensors) > 1:
            raise AlignmentError(f"text embeddings {path}: holds {sorted(tensors)}; name the "
                                 f"table (--tensor-name)")
        tensor_name = next(iter(tensors))
    if tensor_name not in tensors:
        raise AlignmentError(f"text embeddings {path}: no tensor {tensor_name!r}; it holds "
                             f"{sorted(tensors)}")
    return tensors[tensor_name]


def read_pairs(prefix: str | Path) -> Pairs:
    """`[bos] caption [boi] codes [eoi]` documents of a token file, as padded arrays."""
    from megatron_t2i.data.indexed import open_indexed, read_sidecar

    sidecar = read_sidecar(prefix)
    if "layout" not in sidecar:
        raise AlignmentError(f"{prefix}.vocab.json: no 'layout' entry")
    layout = VocabLayout.from_dict(sidecar["layout"])
    docs = open_indexed(prefix, layout, mine="its own sidecar")
    captions, codes = [], []
    for i in range(len(docs)):
        doc = np.asarray(docs[i], dtype=np.int64)
        caption, image = _split_document(doc, layout)
        if caption is not None and len(caption) and len(image):
            captions.append(caption)
            codes.append(image)
    if not codes:
        raise AlignmentError(f"{prefix}: no document holds both a caption and an image")
    lengths = {len(c) for c in codes}
    if len(lengths) > 1:
        raise AlignmentError(f"{prefix}: images have {sorted(lengths)} codes; one size expected")
    width = max(map(len, captions))
    padded = np.zeros((len(captions), width), dtype=np.int64)
    mask = np.zeros((len(captions), width), dtype=bool)
    for i, c in enumerate(captions):
        padded[i, :len(c)], mask[i, :len(c)] = c, True
    return Pairs(torch.from_numpy(padded), torch.from_numpy(mask),
                 torch.from_numpy(np.stack(codes)), layout)


def _split_document(doc: np.ndarray, layout: VocabLayout
                    ) -> tuple[np.ndarray | None, np.ndarray]:
    """Caption text ids (without bos) and image codes of one document."""
    hits = np.flatnonzero(doc == layout.boi_id)
    if len(hits) == 0:
        return None, doc[:0]
    boi = int(hits[0])
    caption = doc[:boi]
    caption = caption[(caption < layout.text_size) & (caption != layout.bos_id)]
    image = doc[boi + 1:]
    image = image[(image >= layout.image_start)
                  & (image < layout.image_start + layout.image_size)]
    return caption, layout.image_code(image)


# ---- the model ------------------------------------------------------------------------------

class ContrastiveAligner(torch.nn.Module):
    """Learnable image-code rows and temperature against a frozen text table."""

    def __init__(self, text_table: torch.Tensor, image_size: int, init_temperature: float,
                 init_std: float | None, generator: torch.Generator) -> None:
        super().__init__()
        self.register_buffer("text_table", text_table, persistent=False)
        std = float(text_table.std()) if init_std is None else init_std
        rows = torch.randn(image_size, text_table.shape[1], generator=generator) * std
        self.image_embeddings = torch.nn.Parameter(rows + text_table.mean(0))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def embed(self, captions: torch.Tensor, mask: torch.Tensor, codes: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm pooled embeddings: images [B, H] and captions [B, H]."""
        image = self.image_embeddings[codes].mean(1)
        weights = mask.to(self.text_table.dtype).unsqueeze(-1)
        caption = (self.text_table[captions] * weights).sum(1) / weights.sum(1)
        return F.normalize(image, dim=-1), F.normalize(caption, dim=-1)

    def forward(self, captions: torch.Tensor, mask: torch.Tensor,
                codes: torch.Tensor) -> torch.Tensor:
        """CLIP's symmetric cross entropy: image i matches caption i among the batch."""
        image, caption = self.embed(captions, mask, codes)
        logits = self.logit_scale.exp() * image @ caption.T  # [B images, B captions]
        target = torch.arange(len(codes), device=codes.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.logit_scale.detach()))


# ---- training -------------------------------------------------------------------------------

@dataclasses.dataclass
class AlignResult:
    image_rows: torch.Tensor  # [image_size, hidden] float32
    losses: list[float]
    temperatures: list[float]
    nearest: dict[str, Any]


def align(text_table: torch.Tensor, pairs: Pairs, cfg: AlignConfig,
          out_dir: str | Path | None = None, tokenizer=None) -> AlignResult:
    """Learn the image rows; write the metrics, rows and nearest-token report to out_dir."""
    layout = pairs.layout
    if text_table.shape[0] < layout.text_size:
        raise AlignmentError(f"the text table has {text_table.shape[0]} rows but the token "
                             f"files' text vocabulary has {layout.text_size} ids: the table "
                             f"must come from the LM whose tokenizer made the captions")
    text_table = text_table[:layout.text_size].float().to(cfg.device)
    if cfg.batch_size < 2:
        raise AlignmentError("batch_size must be at least 2: a contrastive loss needs negatives")
    gen = torch.Generator().manual_seed(cfg.seed)
    model = ContrastiveAligner(text_table, layout.image_size, cfg.init_temperature,
                               cfg.init_std, gen).to(cfg.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS_FILE).write_text("")
    batch = min(cfg.batch_size, len(pairs))
    losses, temperatures = [], []
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        idx = torch.randperm(len(pairs), generator=gen)[:batch]
        loss = model(pairs.captions[idx].to(cfg.device), pairs.caption_mask[idx].to(cfg.device),
                     pairs.codes[idx].to(cfg.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # CLIP: the logits' scale never exceeds max_logit_scale
            model.logit_scale.clamp_(0.0, math.log(cfg.max_logit_scale))
        losses.append(float(loss.detach()))
        temperatures.append(model.temperature)
        _log(out, step, cfg, losses[-1], model, start, batch)
    rows = model.image_embeddings.detach().float().cpu()
    nearest = nearest_text_tokens(rows, text_table.cpu(), cfg.top_k, tokenizer,
                                  seen=torch.bincount(pairs.codes.reshape(-1),
                                                      minlength=layout.image_size) > 0)
    if out is not None:
        save_rows(out / ROWS_FILE, rows, layout, cfg.steps, losses[-1] if losses else None)
        (out / NEAREST_FILE).write_text(json.dumps(nearest, indent=1) + "\n")
    return AlignResult(rows, losses, temperatures, nearest)


def _log(out: Path | None, step: int, cfg: AlignConfig, loss: float,
         model: ContrastiveAligner, start: float, batch: int) -> None:
    record = {"step": step, "loss": loss, "temperature": model.temperature,
              "logit_scale": float(model.logit_scale.detach()), "lr": cfg.lr}
    if out is not None:
        with open(out / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
    if step % cfg.log_interval == 0 or step == 1 or step == cfg.steps:
        print(f"align step {step:6d} | loss {loss:.4f} (chance {math.log(batch):.4f}) | "
              f"temperature {record['temperature']:.4f} | {time.perf_counter() - start:.1f}s",
              flush=True)


def save_rows(path: Path, rows: torch.Tensor, layout: VocabLayout, steps: int,
              final_loss: float | None) -> None:
    from safetensors.torch import save_file

    meta = {"format": "megatron_t2i.contrastive_align/1", "text_size": layout.text_size,
            "image_size": layout.image_size, "hidden": rows.shape[1], "steps": steps,
            "final_loss": final_loss}
    save_file({ROWS_TENSOR: rows.contiguous()}, str(path),
              metadata={k: str(v) for k, v in meta.items()})


# ---- what the codes mean --------------------------------------------------------------------

def nearest_text_tokens(image_rows: torch.Tensor, text_table: torch.Tensor, top_k: int,
                        tokenizer=None, seen: torch.Tensor | None = None) -> dict[str, Any]:
    """For each image code its top-k text tokens by cosine similarity, and a summary: how many
    distinct tokens are anyone's nearest, which ones most often, the mean best cosine."""
    k = min(top_k, text_table.shape[0])
    sims = F.normalize(image_rows, dim=-1) @ F.normalize(text_table, dim=-1).T
    values, ids = sims.topk(k, dim=-1)

    def token(i: int) -> str | None:
        return tokenizer.decode([i]) if tokenizer is not None else None

    codes = []
    for c in range(image_rows.shape[0]):
        entry = {"code": c, "nearest": [{"id": int(i), "token": token(int(i)),
                                          "cosine": round(float(v), 4)}
                                         for v, i in zip(values[c], ids[c])]}
        if seen is not None:
            entry["seen_in_data"] = bool(seen[c])
        codes.append(entry)
    top1 = Counter(int(i) for i in ids[:, 0])
    summary = {"image_codes": image_rows.shape[0], "text_tokens": text_table.shape[0],
               "top_k": k, "distinct_top1_tokens": len(top1),
               "mean_top1_cosine": round(float(values[:, 0].mean()), 4),
               "most_common_top1": [{"id": i, "token": token(i), "codes": n}
                                    for i, n in top1.most_common(20)]}
    if seen is not None:
        summary["codes_seen_in_data"] = int(seen.sum())
    return {"summary": summary, "codes": codes}
