"""FLOPs accounting: a hand count, the effect of each option, and an independent count of a
pure-torch reference transformer by torch's own FlopCounterMode."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import conftest
import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop
from torch.utils.flop_counter import FlopCounterMode

from megatron_t2i.config import ModelConfig
from megatron_t2i.training.flops import flops_per_iteration, mfu


def test_resolved_ffn_hidden_size():
    assert ModelConfig(hidden_size=64, activation="swiglu").resolved_ffn_hidden_size == 192
    assert ModelConfig(hidden_size=4096, activation="swiglu").resolved_ffn_hidden_size == 10944
    assert ModelConfig(hidden_size=96, activation="swiglu").resolved_ffn_hidden_size == 256
    assert ModelConfig(hidden_size=64, activation="gelu").resolved_ffn_hidden_size == 256
    assert ModelConfig(hidden_size=64, ffn_hidden_size=100).resolved_ffn_hidden_size == 100


def test_hand_count_tiny_model():
    # L=2, h=64, a=4 heads of d=16, MHA, SwiGLU with f = 192, V=256, s=16, B=2 -> 32 tokens.
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, activation="swiglu")
    tokens = 2 * 16
    q_proj = 2 * tokens * 64 * 64        # (32 x 64) @ (64 x 64)
    k_proj = 2 * tokens * 64 * 64
    v_proj = 2 * tokens * 64 * 64
    scores = 2 * (2 * 4) * 16 * 16 * 16  # per (batch, head): (16 x 16) @ (16 x 16)
    over_v = 2 * (2 * 4) * 16 * 16 * 16  # per (batch, head): (16 x 16) @ (16 x 16)
    out_proj = 2 * tokens * 64 * 64
    gate = 2 * tokens * 64 * 192         # (32 x 64) @ (64 x 192)
    up = 2 * tokens * 64 * 192
    down = 2 * tokens * 192 * 64
    layer = q_proj + k_proj + v_proj + scores + over_v + out_proj + gate + up + down
    logits = 2 * tokens * 64 * 256       # (32 x 64) @ (64 x 256)
    expected = 3 * (2 * layer + logits)
    assert expected == 24_379_392
    got = flops_per_iteration(cfg, padded_vocab_size=256, seq_length=16, global_batch_size=2)
    assert got == expected


def test_gqa_saves_key_value_projections():
    mha = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=8)
    gqa = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=8, num_query_groups=2)
    args = dict(padded_vocab_size=128, seq_length=32, global_batch_size=4)
    # K and V shrink from 8 heads to 2 heads of d=8: 2 matrices x (64 x 48) fewer, fwd + bwd.
    saved = 3 * 3 * 2 * (4 * 32) * 64 * (2 * (8 - 2) * 8)
    assert flops_per_iteration(mha, **args) - flops_per_iteration(gqa, **args) == saved


def test_swiglu_has_one_more_mlp_matrix_than_gelu():
    args = dict(padded_vocab_size=128, seq_length=32, global_batch_size=4)
    swiglu = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=160, activation="swiglu")
    gelu = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=160, activation="gelu")
    extra = 3 * 2 * 2 * (4 * 32) * 64 * 160  # fwd+bwd x layers x (128 x 64) @ (64 x 160)
    assert flops_per_iteration(swiglu, **args) - flops_per_iteration(gelu, **args) == extra


def test_full_recompute_adds_one_forward_of_the_layers():
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4)
    args = dict(padded_vocab_size=256, seq_length=16, global_batch_size=2)
    plain = flops_per_iteration(cfg, **args)
    logits = 2 * 32 * 64 * 256
    layers_forward = (plain - 3 * logits) / 3
    assert flops_per_iteration(cfg, **args, recompute_full=True) == plain + layers_forward


def test_mfu():
    assert mfu(494.5, 989.0) == pytest.approx(0.5)
    assert math.isnan(mfu(1.0, 0.0))


# ---- an independent count: a pure-torch reference transformer under FlopCounterMode --------

def _reference_params(cfg: ModelConfig, vocab: int) -> list[dict[str, torch.Tensor]]:
    h, a = cfg.hidden_size, cfg.num_attention_heads
    d, g, f = h // a, cfg.num_query_groups or a, cfg.resolved_ffn_hidden_size

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape) * 0.02).requires_grad_()

    layers = []
    for _ in range(cfg.num_layers):
        p = dict(wq=w(h, a * d), wk=w(h, g * d), wv=w(h, g * d), wo=w(a * d, h),
                 w1=w(h, f), w2=w(f, h))
        if cfg.activation == "swiglu":
            p["w3"] = w(h, f)
        layers.append(p)
    return layers + [dict(out=w(h, vocab))]


def _reference_layer(x: torch.Tensor, p: dict[str, torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    b, s, h = x.shape
    a = cfg.num_attention_heads
    d, g = h // a, cfg.num_query_groups or a
    q = (x @ p["wq"]).view(b, s, a, d)
    k = (x @ p["wk"]).view(b, s, g, d).repeat_interleave(a // g, dim=2)  # GQA: share K/V heads
    v = (x @ p["wv"]).view(b, s, g, d).repeat_interleave(a // g, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)  # (b, a, s, s)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
    attn = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, a * d)
    x = x + attn @ p["wo"]
    if cfg.activation == "swiglu":
        hidden = F.silu(x @ p["w1"]) * (x @ p["w3"])
    else:
        hidden = F.gelu(x @ p["w1"])
    return x + hidden @ p["w2"]


def _counted_flops(cfg: ModelConfig, vocab: int, seq: int, batch: int, recompute: bool) -> int:
    torch.manual_seed(0)
    params = _reference_params(cfg, vocab)
    # The embedding output needs a gradient, as in the real model (embedding weights train).
    x = torch.randn(batch, seq, cfg.hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq))
    # Megatron's full recompute reruns the whole layer forward; torch's non-reentrant checkpoint
    # would stop early once the saved tensors it needs are back (skipping the last matmul).
    with FlopCounterMode(display=False) as counter, set_checkpoint_early_stop(False):
        for p in params[:-1]:
            if recompute:
                x = checkpoint(_reference_layer, x, p, cfg, use_reentrant=False)
            else:
                x = _reference_layer(x, p, cfg)
        logits = x @ params[-1]["out"]
        F.cross_entropy(logits.view(-1, vocab), labels.view(-1)).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("activation,groups,recompute", [
    ("swiglu", None, False),
    ("gelu", 2, False),
    ("swiglu", 1, True),
])
def test_matches_flop_counter_of_reference_transformer(activation, groups, recompute):
    # FlopCounterMode counts the full s x s score matrix too (masking is elementwise), so the
    # two counts agree exactly: no tolerance needed.
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                      num_query_groups=groups, activation=activation)
    counted = _counted_flops(cfg, vocab=96, seq=12, batch=3, recompute=recompute)
    assert counted == flops_per_iteration(cfg, padded_vocab_size=96, seq_length=12,
                                          global_batch_size=3, recompute_full=recompute)


# ---- the model that runs: megatron-core's GPTModel from model/gpt.py under FlopCounterMode --

def _gpt_model_flops(model_cfg: ModelConfig, vocab: int, batch: int) -> int:
    """FlopCounterMode's count of one forward + backward of the GPTModel the trainer builds."""
    from megatron.core import tensor_parallel

    from megatron_t2i.config import Config
    from megatron_t2i.model.gpt import build_model_chunks

    tensor_parallel.model_parallel_cuda_manual_seed(0)  # the tracker attention dropout forks
    model = build_model_chunks(Config(model=model_cfg), vocab, on_cuda=False)[0]
    s = model_cfg.seq_length
    tokens = torch.randint(0, vocab, (batch, s), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(s).expand(batch, s)
    with FlopCounterMode(display=False) as counter:
        model(tokens, positions, None, labels=tokens).sum().backward()
    return counter.get_total_flops()




@pytest.fixture(scope="module")
def world_of_one() -> Iterator[None]:
    """gloo with one rank, for the whole module."""
    with conftest.world_of_one():
        yield


@pytest.mark.parametrize("overrides", [
    dict(activation="swiglu", untie_embeddings_and_output_weights=True),
    dict(activation="gelu", num_query_groups=2, untie_embeddings_and_output_weights=False),
    dict(activation="swiglu", num_query_groups=1, position_embedding_type="learned_absolute",
         untie_embeddings_and_output_weights=False),
    dict(activation="gelu", ffn_hidden_size=96, normalization="LayerNorm"),
], ids=["swiglu-mha-untied", "gelu-gqa-tied", "swiglu-mqa-learned-pos-tied", "gelu-ffn96"])
def test_matches_flop_counter_of_the_real_gpt_model(world_of_one, overrides):
    """megatron-core's own attention (core_attention=megatron: baddbmm + bmm) is counted by
    FlopCounterMode matmul for matmul: exact agreement. With the default SDPA core attention
    the CPU kernel (aten._scaled_dot_product_flash_attention_for_cpu) has no FLOP formula in
    torch, so the counter misses exactly the two attention matmuls, forward and backward.
    Neither side counts the input embedding (a lookup) or discounts the causal mask; tied or
    untied, the logits matmul and its two backward matmuls are the same."""
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=8, seq_length=16,
                      **overrides)
    vocab, batch = 256, 2
    formula = flops_per_iteration(cfg, padded_vocab_size=vocab, seq_length=16,
                                  global_batch_size=batch)
    megatron_attention = dataclasses.replace(cfg, core_attention="megatron")
    assert _gpt_model_flops(megatron_attention, vocab, batch) == formula
    attention = 3 * cfg.num_layers * 2 * (2 * batch * 8 * 16 * 16 * (64 // 8))
    assert _gpt_model_flops(cfg, vocab, batch) == formula - attention
