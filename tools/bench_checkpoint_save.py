"""The training stall per checkpoint save, synchronous vs asynchronous (checkpoint.async_save):
one JSON line per mode and a summary line.

    python tools/bench_checkpoint_save.py --config configs/demo.yaml --saves 3 --steps 3

See megatron_t2i/experiments/bench/checkpoint_save.py and docs/performance.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_t2i.experiments.bench.checkpoint_save import main  # noqa: E402

if __name__ == "__main__":  # dist_checkpointing's spawn Manager re-imports __main__
    sys.exit(main())
