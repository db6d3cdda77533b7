"""Auto-regressive sampling: captions -> image codes, prompts -> text completions.

One model at any TP with PP = 1 (generation needs the whole model on each rank; a pipeline
of stages is refused with a message: reshard the checkpoint instead, `load_for_eval` does it).
Decoding uses megatron-core's static KV cache (`StaticInferenceContext`): the prompt is run
once (prefill), then one token per step reads the cached keys and values; with
`use_kv_cache=False` every step recomputes the whole sequence (the reference the cache is
tested against).

Prompts of different lengths are decoded as one group per length (no padding, no attention
mask: any core attention works); tools/generate_images.py sorts captions by length so a batch
holds few groups.

Logits come out of the output layer gathered over the tensor-parallel group
(`runtime_gather_output`), so every TP rank sees the full vocabulary; sampling is restricted
to an id range (image codes for images, text ids for completions), which also keeps the
padded-vocabulary rows out. TP rank 0's draw is broadcast so all ranks continue alike.

Classifier-free guidance: each caption is paired with the null caption `[bos] [boi]` (what
caption dropout trains), decoded alongside it and given the same tokens; the next-token logits
are `uncond + scale * (cond - uncond)`, on the first `guidance_interval` image tokens (0: on
all of them; later tokens follow the caption alone, as guidance matters most for the layout
decided early). A run that never trained the null caption (`data.caption_dropout` 0) gets a
warning: its unconditional logits are meaningless and guided pictures come out as noise.

Inside the image block only image codes are candidates: the logits are cut to the code range
before temperature, top-k and top-p, so no text id or special can be drawn between `[boi]` and
`[eoi]`, and `[eoi]` is appended after the last code (never sampled).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_t2i.config import Config
from megatron_t2i.vocab import VocabLayout


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling: need temperature >= 0, top_k >= 0 and 0 < top_p <= 1, "
                             f"got {self.temperature}, {self.top_k}, {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits [b, v] with everything outside the top-k and the nucleus (the smallest set of
    most likely ids whose probability reaches top_p) set to -inf."""
    logits = logits.float().clone()
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop an id when the mass before it already reaches top_p (the top one always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits[drop] = float("-inf")
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator) -> torch.Tensor:
    """One id per row of logits [b, v] (on the CPU, so a seed gives the same draw anywhere)."""
    logits = logits.float().cpu()
    if params.temperature == 0:
        return logits.argmax(-1)
    filtered = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    return torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(-1)


class Decoder:
    """Runs one model forward over a batch of prompts, with or without a KV cache.

    Prompts are grouped by length and each group runs as its own batch (with its own cache),
    so no sequence is ever padded: every layer implementation (SDPA, megatron's attention,
    Transformer Engine) sees plain causal attention, and positions start at 0 as in training.
    """

    def __init__(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                 max_new_tokens: int, use_kv_cache: bool = True) -> None:
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError("generation runs with pipeline_model_parallel_size=1 only: load the "
                             "checkpoint at PP=1 (any TP); it is resharded on load")
        if not prompts or min(len(p) for p in prompts) == 0:
            raise ValueError("decoder: every prompt needs at least one token")
        self.model = model
        self.device = next(model.parameters()).device
        self.size = len(prompts)
        self.groups = []  # (row indices, tokens [g, length], KV cache or None, tokens cached)
        for length in sorted({len(p) for p in prompts}):
            rows = [i for i, p in enumerate(prompts) if len(p) == length]
            tokens = torch.tensor([list(prompts[i]) for i in rows], dtype=torch.int64)
            context = StaticInferenceContext(len(rows), length + max_new_tokens) \
                if use_kv_cache else None
            self.groups.append([torch.tensor(rows), tokens, context, 0])
        self.generated: list[torch.Tensor] = []  # one [batch] tensor per appended step

    def logits(self) -> torch.Tensor:
        """Next-token logits [batch, vocab] after the tokens so far (gathered over TP)."""
        out = None
        for group in self.groups:
            rows, tokens, context, cached = group
            new = tokens[:, cached:] if context is not None else tokens
            first = cached if context is not None else 0
            positions = torch.arange(first, first + new.shape[1]).expand_as(new)
            with torch.no_grad():
                logits = self.model(input_ids=new.to(self.device),
                                    position_ids=positions.to(self.device),
                                    attention_mask=None, inference_context=context,
                                    runtime_gather_output=True)[:, -1, :]
            if context is not None:
                context.increment_sequence_len_offset(new.shape[1])
                group[3] = tokens.shape[1]
            if out is None:
                out = logits.new_empty(self.size, logits.shape[-1])
            out[rows.to(self.device)] = logits
        return out

    def append(self, next_tokens: torch.Tensor) -> None:
        """Extend every row by its token of next_tokens [batch]."""
        next_tokens = next_tokens.view(-1).cpu()
        for group in self.groups:
            group[1] = torch.cat([group[1], next_tokens[group[0]].view(-1, 1)], dim=1)
        self.generated.append(next_tokens)


def _agree_across_tensor_parallel(tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """TP rank 0's draw for every rank of its tensor-parallel group."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return tokens
    tokens = tokens.to(device)
    dist.broadcast(tokens, parallel_state.get_tensor_model_parallel_src_rank(),
                   group=parallel_state.get_tensor_model_parallel_group())
    return tokens.cpu()


# ---- captions -> image codes ----------------------------------------------------------------

def caption_prompt(caption_ids: Sequence[int], layout: VocabLayout) -> list[int]:
    """`[bos] caption [boi]`; the empty caption gives the null prompt `[bos] [boi]`."""
    return [layout.bos_id, *caption_ids, layout.boi_id]


def next_image_ids(logits: torch.Tensor, layout: VocabLayout, params: SamplingParams,
                   generator: torch.Generator, guidance_scale: float = 1.0) -> torch.Tensor:
    """The next image-code ids (vocabulary ids) from full-vocabulary logits [b, v]; with
    guidance, rows [0, b/2) are the captions and [b/2, b) their null captions, and the
    result has b/2 rows. Only code ids can come out, whatever top-k / top-p keep."""
    lo, hi = layout.image_start, layout.image_start + layout.image_size
    logits = logits[:, lo:hi].float()
    if guidance_scale != 1.0:
        cond, uncond = logits.chunk(2)
        logits = uncond + guidance_scale * (cond - uncond)
    return sample_next(logits, params, generator) + lo


def generate_image_block(model: torch.nn.Module, layout: VocabLayout,
                         captions: Sequence[Sequence[int]], tokens_per_image: int,
                         params: SamplingParams, guidance_scale: float = 1.0,
                         use_kv_cache: bool = True, guidance_interval: int = 0
                         ) -> torch.Tensor:
    """What follows `[bos] caption [boi]`: ids [n, tokens_per_image + 1], the sampled image
    codes (vocabulary ids) and the forced `[eoi]`. guidance_scale 1 is plain conditional
    sampling; guidance_interval > 0 guides the first that many codes only."""
    prompts = [caption_prompt(c, layout) for c in captions]
    guided = guidance_scale != 1.0
    if guided:
        prompts += [caption_prompt([], layout)] * len(captions)
    decoder = Decoder(model, prompts, tokens_per_image, use_kv_cache)
    generator = torch.Generator().manual_seed(params.seed)
    n = len(captions)
    for step in range(tokens_per_image):
        logits = decoder.logits()
        scale = guidance_scale if not guidance_interval or step < guidance_interval else 1.0
        if guided and scale == 1.0:
            logits = logits[:n]
        ids = _agree_across_tensor_parallel(
            next_image_ids(logits, layout, params, generator, scale), decoder.device)
        decoder.append(torch.cat([ids, ids]) if guided else ids)
    decoder.generated.append(torch.full((len(prompts),), layout.eoi_id))  # never sampled
    return torch.stack(decoder.generated, dim=1)[:n]


def generate_image_codes(model: torch.nn.Module, layout: VocabLayout,
                         captions: Sequence[Sequence[int]], tokens_per_image: int,
                         params: SamplingParams, guidance_scale: float = 1.0,
                         use_kv_cache: bool = True, guidance_interval: int = 0) -> np.ndarray:
    """Codes [n, tokens_per_image] (codebook indices) for tokenized captions: the image
    block of `generate_image_block` without its `[eoi]`."""
    block = generate_image_block(model, layout, captions, tokens_per_image, params,
                                 guidance_scale, use_kv_cache, guidance_interval)
    return block[:, :-1].numpy() - layout.image_start


def warn_if_unguidable(cfg: Config, guidance_scale: float) -> str | None:
    """The warning for guidance from a run that never trained the null caption, or None."""
    if guidance_scale == 1.0 or cfg.data.caption_dropout > 0:
        return None
    return (f"warning: --guidance-scale {guidance_scale:g} but this run trained with "
            f"data.caption_dropout=0, so it never saw the null caption `[bos] [boi]` that "
            f"guidance subtracts; expect noise. Train with data.caption_dropout=0.1 (or use "
            f"--guidance-scale 1)")


# ---- prompts -> text completions ------------------------------------------------------------

def complete_text(model: torch.nn.Module, layout: VocabLayout,
                  prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  params: SamplingParams = SamplingParams(temperature=0.0),
                  use_kv_cache: bool = True) -> list[list[int]]:
    """Continuations of `[bos] prompt` (text ids only), each cut at the first `eod`."""
    decoder = Decoder(model, [[layout.bos_id, *p] for p in prompts], max_new_tokens,
                      use_kv_cache)
    generator = torch.Generator().manual_seed(params.seed)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        logits = decoder.logits()[:, :layout.text_size]
        ids = _agree_across_tensor_parallel(sample_next(logits, params, generator),
                                            decoder.device)
        for i, token in enumerate(ids.tolist()):
            if not done[i]:
                if token == layout.eod_id:
                    done[i] = True
                else:
                    out[i].append(token)
        if bool(done.all()):
            break
        decoder.append(ids)
    return out


# ---- the tool: captions -> PNG grid ---------------------------------------------------------

def generate_images(checkpoint: str | Path, captions: Sequence[str], out_dir: str | Path,
                    tp: int = 1, params: SamplingParams = SamplingParams(),
                    guidance_scale: float = 1.0, batch_size: int = 16,
                    text_tokenizer: str | Path | None = None,
                    image_tokenizer: str | Path | None = None,
                    image_tokenizer_kind: str | None = None,
                    use_kv_cache: bool = True, guidance_interval: int = 0) -> dict:
    """Sample one image per caption; rank 0 writes `samples.npz` (codes, images, captions),
    `grid.png` (images with their captions under them) and `images/NNNNN.png`.
    Captions are batched in order of token length; batch b is sampled with seed
    params.seed + b, so results do not depend on TP. Data-parallel replicas (more processes
    than TP) repeat the same work."""
    from megatron_t2i.eval import loading

    cfg, chunks, layout, _ = loading.load_for_eval(checkpoint, tp, 1)
    if (warning := warn_if_unguidable(cfg, guidance_scale)) and loading.is_writer():
        print(warning, file=sys.stderr, flush=True)
    text = loading.text_tokenizer_for(cfg, text_tokenizer)
    image = loading.image_tokenizer_for(cfg, image_tokenizer_kind, image_tokenizer)
    if image.tokens_per_image != cfg.data.image_tokens_per_sample or \
            image.codebook_size != layout.image_size:
        raise ValueError(f"image tokenizer gives {image.tokens_per_image} codes of "
                         f"{image.codebook_size} but the checkpoint was trained on "
                         f"{cfg.data.image_tokens_per_sample} codes of {layout.image_size}")
    ids = [text.encode(c) for c in captions]
    order = np.argsort([len(i) for i in ids], kind="stable")  # few lengths per batch
    codes_arr = np.empty((len(ids), image.tokens_per_image), dtype=np.int64)
    for b, start in enumerate(range(0, len(ids), batch_size)):
        rows = order[start:start + batch_size]
        codes_arr[rows] = generate_image_codes(
            chunks[0], layout, [ids[i] for i in rows], image.tokens_per_image,
            dataclasses.replace(params, seed=params.seed + b), guidance_scale, use_kv_cache,
            guidance_interval)
    g = image.grid_size
    images = image.decode(codes_arr.reshape(len(codes_arr), g, g))
    out = Path(out_dir)
    if loading.is_writer():
        write_samples(out, codes_arr, images, list(captions))
    return {"out_dir": str(out), "num_images": len(images), "codes": codes_arr.tolist(),
            "guidance_scale": guidance_scale, "guidance_interval": guidance_interval,
            **dataclasses.asdict(params)}


def write_samples(out: Path, codes: np.ndarray, images: np.ndarray,
                  captions: list[str]) -> None:
    from PIL import Image

    (out / "images").mkdir(parents=True, exist_ok=True)
    np.savez(out / "samples.npz", codes=codes, images=images, captions=np.array(captions))
    for i, img in enumerate(images):
        Image.fromarray(img).save(out / "images" / f"{i:05d}.png")
    caption_grid(images, captions).save(out / "grid.png")


def caption_grid(images: np.ndarray, captions: Sequence[str], columns: int = 4,
                 cell: int = 160):
    """A PIL image: the images (upscaled to `cell` px, nearest) in rows, each caption
    wrapped under its image."""
    import textwrap

    from PIL import Image, ImageDraw

    text_height, line = 52, 12
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * cell, rows * (cell + text_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_height)
        grid.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (x, y))
        for k, text in enumerate(textwrap.wrap(caption, width=cell // 6)[:4]):
            draw.text((x + 2, y + cell + 1 + k * line), text, fill="black")
    return grid
