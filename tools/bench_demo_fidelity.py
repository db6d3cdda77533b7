"""Does the demo follow its captions? Caption fidelity of greedy samples for held-out captions.

    python tools/bench_demo_fidelity.py --checkpoint runs/demo/checkpoints [--count 100]

Takes the captions of the first `--count` documents of the demo corpus's test split (never
trained on), samples one image per caption (greedily and without guidance unless asked) and
prints the scores of
megatron_t2i/eval/fidelity.py next to the demo's goal (exact >= 0.8, colour >= 0.9). A
benchmark, not a test: it prints figures; exit status 0 unless something failed to run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

GOAL = {"exact": 0.8, "colour": 0.9}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint root or iter_N folder")
    parser.add_argument("--count", type=int, default=100, help="held-out captions")
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--guidance-interval", type=int, default=0, help="0 = every token")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for the samples (default: temp)")
    args = parser.parse_args(argv)
    from pathlib import Path

    from megatron_t2i.checkpoint.layout import read_meta, resolve_folder
    from megatron_t2i.config import config_from_dict
    from megatron_t2i.eval.fidelity import fidelity_of_samples
    from megatron_t2i.eval.generate import SamplingParams, generate_images
    from megatron_t2i.training.sampling import held_out_captions
    from megatron_t2i.vocab import VocabLayout

    meta = read_meta(
        resolve_folder(Path(args.checkpoint)))
    cfg = config_from_dict(meta["config"], source="checkpoint meta.json")
    captions = held_out_captions(cfg, VocabLayout.from_dict(meta["vocab"]), args.count)
    out = args.out or tempfile.mkdtemp(prefix="demo-fidelity-")
    generate_images(args.checkpoint, captions, out,
                    params=SamplingParams(temperature=args.temperature, seed=args.seed),
                    guidance_scale=args.guidance_scale, batch_size=50,
                    guidance_interval=args.guidance_interval)
    scores = fidelity_of_samples(Path(out) / "samples.npz")
    met = all(scores[k] >= v for k, v in GOAL.items())
    print(json.dumps(scores, indent=2))
    how = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}"
    print(f"{how}, guidance {args.guidance_scale:g} (interval {args.guidance_interval}), "
          f"{len(captions)} held-out captions: exact {scores['exact']:.3f} "
          f"count {scores['count']:.3f} position {scores['position']:.3f} "
          f"shape {scores['shape']:.3f} colour {scores['colour']:.3f}; goal (exact >= 0.8, "
          f"colour >= 0.9) {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
