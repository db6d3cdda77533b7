"""Tokens/s of a config under the megatron and deepspeed engines (ZeRO 1/2/3) side by side.

    python tools/bench_engines.py --config configs/demo.yaml --nproc 2 --iters 30 --warmup 5

See megatron_t2i/experiments/bench/engines.py.
"""

import sys

from megatron_t2i.experiments.bench.engines import main

if __name__ == "__main__":
    sys.exit(main())
