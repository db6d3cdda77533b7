"""Training throughput of a config (tokens/s, TFLOP/s per GPU, MFU, peak memory, step times)
as one JSON line; `--peer hf` also times the same model as a HF LlamaForCausalLM.

    python tools/bench_throughput.py --config configs/demo.yaml --iters 10 --warmup 3 --peer hf
    torchrun --nproc_per_node 2 tools/bench_throughput.py --config configs/demo.yaml

See megatron_t2i/experiments/bench/throughput.py and docs/performance.md.
"""

import sys

from megatron_t2i.experiments.bench.throughput import main

if __name__ == "__main__":  # dist_checkpointing's spawn Manager re-imports __main__
    sys.exit(main())
