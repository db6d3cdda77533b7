"""What the model learned, shown while it trains: samples of a fixed set of captions.

    sampler = TrainingSampler(cfg, layout, run_dir)   # on every rank
    if sampler.due(iteration, final=False):
        sampler.run(model_chunk, iteration, metrics)   # collective over the TP group

The captions are `train.sample_captions` plus the lines of `train.sample_captions_file`; with
neither, the captions of the first `train.sample_count` documents of the test split (held out:
never trained on) of the run's first image-caption token files. Each round decodes them
greedily with the KV cache (eval/generate.py), the image tokenizer turns the codes into
pictures, and the writer rank saves

    <run_dir>/samples/iter_N.png       the images with their captions under them
    <run_dir>/samples/iter_N.npz       codes, images, captions (tools/caption_fidelity.py)
    <run_dir>/samples/fidelity.json    caption fidelity, when every caption is one of the
                                       synthetic corpus's (the demo); the latest round

and logs the grid to TensorBoard and W&B. A round's wall time is printed; it is outside the
iteration time the throughput figures use. Data-parallel rank 0's tensor-parallel group does
the work (the other replicas would repeat it); pipeline-parallel and ZeRO-3 runs skip it, since
generation needs the whole model on each rank (use tools/generate_images.py on a checkpoint).
With `train.ema_decay` the samples are of the averaged weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from megatron.core import parallel_state

from megatron_t2i.config import Config, ConfigError
from megatron_t2i.eval.generate import SamplingParams, caption_grid, generate_image_codes
from megatron_t2i.vocab import VocabLayout


def fixed_captions(cfg: Config, layout: VocabLayout) -> list[str]:
    """The captions every sampling round of this run uses (see the module docstring)."""
    t = cfg.train
    captions = [c for c in t.sample_captions if c.strip()]
    if t.sample_captions_file:
        path = Path(t.sample_captions_file)
        if not path.is_file():
            raise ConfigError(f"train.sample_captions_file: {path} not found")
        lines = path.read_text(encoding="utf-8").splitlines()
        captions += [ln.strip() for ln in lines if ln.strip()]
    if captions or t.sample_count == 0:
        return captions
    return held_out_captions(cfg, layout, t.sample_count)


def held_out_captions(cfg: Config, layout: VocabLayout, count: int) -> list[str]:
    """Captions of the first `count` captioned documents of the test split (else the
    validation split) of the run's first image-caption token files."""
    from megatron_t2i.data.dataset import split_documents
    from megatron_t2i.data.indexed import open_indexed
    from megatron_t2i.data.loader import document_split_seed, resolve_sources
    from megatron_t2i.eval.loading import text_tokenizer_for

    sources = [s for s in resolve_sources(cfg)[0] if not s.is_text]
    if not sources:
        return []
    indexed = open_indexed(sources[0].prefix, layout)
    _, valid, test = split_documents(len(indexed), cfg.data.split,
                                    seed=document_split_seed(cfg))
    text = text_tokenizer_for(cfg)
    captions = []
    for doc_id in (test if len(test) else valid):
        doc = np.asarray(indexed[int(doc_id)])
        boi = np.flatnonzero(doc == layout.boi_id)
        if len(boi) and boi[0] > 1:  # skip image-only (and dropped-caption) documents
            captions.append(text.decode(doc[1:boi[0]].tolist()))
        if len(captions) == count:
            break
    return captions


class TrainingSampler:
    def __init__(self, cfg: Config, layout: VocabLayout, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.layout = layout
        self.out = Path(run_dir) / "samples"
        wanted = cfg.train.sample_at_end or bool(cfg.train.sample_interval)
        self.captions = fixed_captions(cfg, layout) if wanted else []
        self._tokenizers = None
        if self.captions and self._samples_here():
            self._load_tokenizers()  # now: a missing tokenizer fails before training starts

    def due(self, iteration: int, final: bool) -> bool:
        t = self.cfg.train
        if not self.captions:
            return False
        if final:
            return t.sample_at_end and not (t.sample_interval and iteration % t.sample_interval
                                            == 0)
        return bool(t.sample_interval) and iteration % t.sample_interval == 0

    def run(self, model: torch.nn.Module, iteration: int, metrics, is_writer: bool
            ) -> dict[str, float] | None:
        """One round (see the module docstring); returns the fidelity scores, if any."""
        if not self._samples_here():
            if is_writer:
                print(f"[megatron_t2i] samples at iteration {iteration} skipped: sampling "
                      f"needs the whole model on a rank (pipeline_model_parallel_size=1, "
                      f"no ZeRO-3)", flush=True)
            return None
        start = time.perf_counter()
        images, codes = self._sample(model)
        seconds = time.perf_counter() - start
        if not is_writer:
            return None
        scores = self._write(iteration, images, codes)
        metrics.log_samples(iteration, caption_grid(images, self.captions), scores)
        print(f"[megatron_t2i] samples at iteration {iteration}: {len(images)} captions in "
              f"{seconds:.2f}s (not counted in throughput) -> {self.out}/iter_{iteration}.png"
              + (f"; fidelity exact {scores['exact']:.3f} colour {scores['colour']:.3f}"
                 if scores else ""), flush=True)
        return scores

    def _samples_here(self) -> bool:
        zero3 = self.cfg.train.engine == "deepspeed" and self.cfg.deepspeed.zero_stage == 3
        return (parallel_state.get_pipeline_model_parallel_world_size() == 1 and not zero3
                and parallel_state.get_data_parallel_rank() == 0)

    def _sample(self, model: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
        text, image = self._load_tokenizers()
        ids = [text.encode(c) for c in self.captions]
        was_training = model.training
        model.eval()
        try:
            codes = generate_image_codes(model, self.layout, ids, image.tokens_per_image,
                                         SamplingParams(temperature=0.0))
        finally:
            model.train(was_training)
        g = image.grid_size
        return image.decode(codes.reshape(len(codes), g, g)), codes

    def _load_tokenizers(self):
        if self._tokenizers is None:
            from megatron_t2i.eval.loading import image_tokenizer_for, text_tokenizer_for

            self._tokenizers = text_tokenizer_for(self.cfg), image_tokenizer_for(self.cfg)
        return self._tokenizers

    def _write(self, iteration: int, images: np.ndarray, codes: np.ndarray
               ) -> dict[str, float] | None:
        self.out.mkdir(parents=True, exist_ok=True)
        caption_grid(images, self.captions).save(self.out / f"iter_{iteration}.png")
        np.savez(self.out / f"iter_{iteration}.npz", codes=codes, images=images,
                 captions=np.array(self.captions))
        scores = synthetic_fidelity(images, self.captions)
        if scores is not None:
            record = {"iteration": iteration, **scores}
            (self.out / "fidelity.json").write_text(json.dumps(record, indent=2) + "\n")
        return scores


def synthetic_fidelity(images: np.ndarray, captions: list[str]) -> dict[str, float] | None:
    """Caption fidelity when every caption is the synthetic corpus's, else None."""
    from megatron_t2i.data.synthetic import parse_caption
    from megatron_t2i.eval.fidelity import caption_fidelity

    try:
        for c in captions:
            parse_caption(c)
    except ValueError:
        return None
    return caption_fidelity(images, captions)
