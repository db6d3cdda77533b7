"""Model FLOPs of one training iteration, for TFLOP/s and MFU on the dashboards.

Only matrix multiplications are counted (norms, softmax, activations, rotary embeddings and
the optimizer step are a few percent at these sizes and are left out). A matmul of an
(m x k) by a (k x n) matrix costs 2*m*k*n FLOPs. With

    B = global batch size (sequences), s = sequence length, h = hidden size,
    L = layers, a = attention heads, d = h / a (head size), g = query groups (g = a for MHA),
    f = MLP hidden size, V = padded vocabulary size, n_mlp = 3 (SwiGLU) or 2 (GeLU),

the forward pass of one transformer layer costs

    QKV projections        2 * B*s * h * (a*d + 2*g*d)
    attention scores QK^T  2 * B*a * s*s * d
    attention over V       2 * B*a * s*s * d
    output projection      2 * B*s * (a*d) * h
    MLP                    2 * B*s * h * f * n_mlp

and the logits layer 2 * B*s * h * V. The backward pass costs twice the forward (one matmul
for the input gradient, one for the weight gradient), so an iteration costs

    3 * (L * layer + logits)  [+ L * layer with full activation recomputation]

since full recomputation repeats the forward of the transformer layers, not of the logits.

Causal masking is NOT discounted: the attention terms count the full s x s score matrix.
This is the convention of Narayanan et al. 2021 ("Efficient Large-Scale Language Model
Training on GPU Clusters", appendix) and of Megatron-LM's `num_floating_point_operations`
as of 2024; newer Megatron-LM releases halve the attention terms for the causal mask, so at
long sequence lengths our TFLOP/s read slightly higher than theirs.

tests/test_flops.py holds the formula against torch's FlopCounterMode on the GPTModel that
model/gpt.py builds (forward + backward): exact with megatron-core's own core attention; with
SDPA on the CPU the counter misses the attention matmuls, for which torch has no formula
(docs/performance.md).
"""

from __future__ import annotations

from megatron_t2i.config import ModelConfig


def _layer_forward_flops(model_cfg: ModelConfig, tokens: int, seq_length: int) -> int:
    """Forward matmul FLOPs of one transformer layer over `tokens` = B * s positions."""
    h, a = model_cfg.hidden_size, model_cfg.num_attention_heads
    d = h // a
    g = model_cfg.num_query_groups or a
    f = model_cfg.resolved_ffn_hidden_size
    n_mlp = 3 if model_cfg.activation == "swiglu" else 2
    qkv = 2 * tokens * h * (a * d + 2 * g * d)
    scores = 2 * tokens * seq_length * a * d  # B*a*s*s*d, no causal discount
    over_values = 2 * tokens * seq_length * a * d
    out_proj = 2 * tokens * a * d * h
    mlp = 2 * tokens * h * f * n_mlp
    return qkv + scores + over_values + out_proj + mlp


def flops_per_iteration(model_cfg: ModelConfig, padded_vocab_size: int, seq_length: int,
                        global_batch_size: int, recompute_full: bool = False) -> float:
    """Training FLOPs (forward + backward, all GPUs together) of one optimizer step."""
    tokens = global_batch_size * seq_length
    layers = model_cfg.num_layers * _layer_forward_flops(model_cfg, tokens, seq_length)
    logits = 2 * tokens * model_cfg.hidden_size * padded_vocab_size
    total = 3 * (layers + logits) + (layers if recompute_full else 0)
    return float(total)


def mfu(tflops_per_gpu: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved model TFLOP/s per GPU as a fraction of the peak."""
    return tflops_per_gpu / peak_tflops if peak_tflops > 0 else float("nan")
