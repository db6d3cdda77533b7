"""Benchmarks: training throughput through the real engine, and a Hugging Face peer.

    python tools/bench_throughput.py --config configs/demo.yaml --iters 10 --warmup 3 --peer hf

`throughput.run_benchmark` returns the figures the tool prints; `hf_peer` builds the
equivalent LlamaForCausalLM. See docs/performance.md for the FLOPs formula and the figures.
"""
