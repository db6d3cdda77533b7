"""What a trainer checkpoint holds, read from its metadata alone (no tensor is loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_t2i.checkpoint.io import CheckpointReader
from megatron_t2i.vocab import VocabLayout


def describe(path: str | Path) -> dict[str, Any]:
    """Iteration, config summary, vocabulary layout, every tensor (shape, dtype, shards)."""
    reader = CheckpointReader(path)
    meta = reader.meta
    tensors = []
    for key in reader.tensor_keys():
        spec = reader.spec(key)
        tensors.append({"key": key, "shape": list(spec.shape),
                        "dtype": str(spec.dtype).removeprefix("torch."),
                        "shards": len(reader.chunks(key)), "bytes": spec.nbytes})
    model = meta.get("config", {}).get("model", {})
    summary_keys = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                    "ffn_hidden_size", "normalization", "activation", "position_embedding_type",
                    "untie_embeddings_and_output_weights")
    return {
        "folder": str(reader.folder),
        "iteration": meta.get("iteration"),
        "consumed_samples": meta.get("consumed_samples"),
        "model": {k: model.get(k) for k in summary_keys},
        "parallel": meta.get("parallel"),
        "vocab": meta.get("vocab"),
        "padded_vocab_size": meta.get("padded_vocab_size"),
        "has_optimizer": any(t["key"].startswith("optimizer") for t in tensors)
        or any(k.startswith("optimizer") for k in reader.object_keys()),
        "tensors": tensors,
        "objects": len(reader.object_keys()),
        "total_bytes": sum(t["bytes"] for t in tensors),
        "files_bytes": sum(p.stat().st_size for p in reader.folder.iterdir() if p.is_file()),
    }


def format_report(info: dict[str, Any], show_optimizer: bool = True) -> str:
    lines = [f"checkpoint {info['folder']}",
             f"iteration {info['iteration']}, consumed samples {info['consumed_samples']}",
             "model: " + ", ".join(f"{k}={v}" for k, v in info["model"].items()),
             f"saved under parallel layout: {info['parallel'] or 'none (imported)'}"]
    if info["vocab"]:
        layout = VocabLayout.from_dict(info["vocab"])
        ranges = ", ".join(f"{k} [{a}, {b})" for k, (a, b) in layout.ranges().items())
        lines.append(f"vocabulary: {layout.size} ids ({ranges}), padded to "
                     f"{info['padded_vocab_size']}")
    lines.append(f"optimizer state: {'yes' if info['has_optimizer'] else 'no'}")
    width = max(len(t["key"]) for t in info["tensors"])
    lines.append(f"{'tensor':<{width}}  {'shape':<22} {'dtype':<9} shards")
    for t in info["tensors"]:
        if not show_optimizer and t["key"].startswith("optimizer"):
            continue
        lines.append(f"{t['key']:<{width}}  {str(tuple(t['shape'])):<22} {t['dtype']:<9} "
                     f"{t['shards']}")
    lines.append(f"{len(info['tensors'])} tensors ({info['total_bytes'] / 2**20:,.1f} MiB), "
                 f"{info['objects']} objects; {info['files_bytes'] / 2**20:,.1f} MiB on disk")
    return "\n".join(lines)
