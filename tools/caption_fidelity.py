"""Caption fidelity of images generated for the demo corpus: how often an image shows the
shapes, colours and positions its caption asks for.

    python tools/caption_fidelity.py --samples samples/samples.npz [--out fidelity.json]

Reads the `images` and `captions` arrays tools/generate_images.py writes. See
megatron_t2i/eval/fidelity.py.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", required=True, help="samples.npz (images, captions)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from megatron_t2i.eval.cli import print_report, run_tool
    from megatron_t2i.eval.fidelity import fidelity_of_samples

    return run_tool(lambda: fidelity_of_samples(args.samples),
                    lambda report: print_report(report, args.out), distributed=False)


if __name__ == "__main__":
    sys.exit(main())
