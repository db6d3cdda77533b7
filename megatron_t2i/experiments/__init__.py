"""Applications built on the trainer library: the mini-study, contrastive alignment, the
benchmarks and run charts. They import the library; nothing under megatron_t2i outside this
package imports them (tests/test_layering.py)."""
