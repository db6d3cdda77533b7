"""FID between generated and reference images, with Inception weights from a local file.

    python tools/fid.py --generated samples/samples.npz --reference ref_images/ \
        --inception-weights pt_inception-2015-12-05-6726825d.pth [--device cuda] [--out fid.json] \
        [--clip-model clip-vit-large-patch14/ [--captions-file captions.txt]]

Each set is an .npz with an `images` array (uint8 [n, h, w, 3]) or a folder of PNG/JPEG
files. The weights are pytorch-fid's FID Inception file (nothing is downloaded). With
--clip-model (a local transformers CLIP folder) the report adds the CLIP score of the generated
images against their captions: the .npz's `captions` array, or --captions-file (one per line,
in the order of the images). See megatron_t2i/eval/fid.py, inception.py and clip_score.py,
and docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generated", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--inception-weights", required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    parser.add_argument("--clip-model", default=None,
                        help="local CLIP checkpoint folder: adds the CLIP score")
    parser.add_argument("--captions-file", default=None,
                        help="captions of the generated images, one per line (default: the "
                             "generated .npz's `captions` array)")
    args = parser.parse_args(argv)
    from megatron_t2i.eval.cli import print_report, run_tool
    from megatron_t2i.eval.fid import fid_report

    if args.captions_file and not args.clip_model:
        parser.error("--captions-file is for the CLIP score: give --clip-model too")
    return run_tool(lambda: fid_report(args.generated, args.reference, args.inception_weights,
                                       args.batch_size, args.device, args.clip_model,
                                       args.captions_file),
                    lambda report: print_report(report, args.out), distributed=False)


if __name__ == "__main__":
    sys.exit(main())
