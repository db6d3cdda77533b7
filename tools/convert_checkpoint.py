"""Import a pretrained LM into a trainer checkpoint, or export one to Hugging Face Llama.

    python tools/convert_checkpoint.py import-hf     HF_DIR OUT [--tp 2] [--pp 1] [--dtype fp32]
    python tools/convert_checkpoint.py import-openlm CKPT.pt OUT --model-config open_lm_1b.json
    python tools/convert_checkpoint.py export-hf     CHECKPOINT OUT_HF_DIR [--dtype bf16]

OUT is a checkpoint root (iter_0000000/ + latest) with the text-only vocabulary layout; grow
it with tools/resize_vocab.py, then train with checkpoint.dir=OUT (or copy it to
<run_dir>/checkpoints).
"""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("import-hf", "import-openlm"):
        s = sub.add_parser(name)
        s.add_argument("source")
        s.add_argument("output")
        s.add_argument("--tp", type=int, default=1, help="target tensor parallel size")
        s.add_argument("--pp", type=int, default=1, help="target pipeline parallel size")
        s.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
        s.add_argument("--dtype", choices=DTYPES, default="fp32")
        s.add_argument("--overwrite", action="store_true")
    o = sub.choices["import-openlm"]
    o.add_argument("--model-config", help="open_lm model config JSON (n_heads, norm_eps, ...)")
    o.add_argument("--num-attention-heads", type=int)
    o.add_argument("--norm", choices=("layer_norm", "rms_norm"), default="layer_norm")
    o.add_argument("--bos-id", type=int, default=0)
    o.add_argument("--eod-id", type=int, default=0, help="GPT-NeoX's <|endoftext|> is 0")
    o.add_argument("--pad-id", type=int, default=None)
    e = sub.add_parser("export-hf")
    e.add_argument("checkpoint")
    e.add_argument("output")
    e.add_argument("--dtype", choices=DTYPES, default=None, help="default: as stored")
    e.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    from megatron_t2i.checkpoint.convert import import_checkpoint
    from megatron_t2i.checkpoint.hf import HFSource, export_hf
    from megatron_t2i.checkpoint.layout import TOOL_INPUT_ERRORS, tool_error
    from megatron_t2i.checkpoint.openlm import OpenLMSource

    try:
        if args.command == "export-hf":
            stats = export_hf(args.checkpoint, args.output,
                              DTYPES[args.dtype] if args.dtype else None, args.overwrite)
        else:
            if args.command == "import-hf":
                src = HFSource(args.source)
            else:
                src = OpenLMSource(args.source, args.model_config, args.num_attention_heads,
                                   args.norm, args.bos_id, args.eod_id, args.pad_id)
            stats = import_checkpoint(src, args.output, args.tp, args.pp,
                                      args.make_vocab_size_divisible_by, DTYPES[args.dtype],
                                      args.overwrite)
    except TOOL_INPUT_ERRORS as err:
        return tool_error(err, args.source if args.command != 'export-hf' else args.checkpoint)
    print(f"{args.command}: wrote {args.output}: {stats.summary()}")
    if "layout" in stats.extra:
        print(f"vocabulary: {stats.extra['layout'].size} ids padded to "
              f"{stats.extra['padded_vocab_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
