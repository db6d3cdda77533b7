"""Caption fidelity of images generated for the demo corpus: how often an image shows the
shapes, colours and positions its caption asks for.

    python tools/caption_fidelity.py --samples samples/samples.npz [--out fidelity.json]

Reads the `images` and `captions` arrays tools/generate_images.py writes. See
megatron_t2i/eval/fidelity.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", required=True, help="samples.npz (images, captions)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from megatron_t2i.eval.fidelity import fidelity_of_samples

    try:
        report = fidelity_of_samples(args.samples)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
