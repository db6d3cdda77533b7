"""The paper's experiments in miniature, on a CPU: one command, a report with figures.

    python tools/mini_study.py --quick            # under 10 minutes on two cores
    python tools/mini_study.py                    # the full mode: under an hour
    python tools/mini_study.py --out runs/ms --jobs 4

    python tools/mini_study.py --quick --corpus shapes   # the positive control

Pretrains a small LM on English (WordNet glosses, fortunes, docstrings) and a control LM on
the same words shuffled, grows their vocabularies by VQ image codes, and trains, for every
seed, text-to-image from them and from random init on Fashion-MNIST mosaics, the
unconditional and frozen variants, the 64-codes ablation, alignment to the LM's table and to
a random one, and the forgetting evaluation along training; then computes the verdicts and
writes <out>/report.md, <out>/summary.json and PNG figures. See megatron_t2i/experiments/study/.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the quick mode (fewer iterations)")
    p.add_argument("--out", default=None,
                   help="output folder (default: runs/mini_study/quick or runs/mini_study/full)")
    p.add_argument("--jobs", type=int, default=None,
                   help="steps run side by side (default: the cores, at most 4)")
    p.add_argument("--corpus", choices=("fashion", "shapes"), default=None,
                   help="fashion: Fashion-MNIST mosaics (default); shapes: the synthetic "
                        "shapes corpus, the positive control")
    p.add_argument("--fresh", action="store_true",
                   help="delete the output folder first (default: reuse finished steps)")
    args = p.parse_args(argv)
    from megatron_t2i.experiments.study.pipeline import StudyError, run_study

    out = Path(args.out or f"runs/mini_study/{'quick' if args.quick else 'full'}")
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    try:
        run_study(out, quick=args.quick, jobs=args.jobs, corpus=args.corpus)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
