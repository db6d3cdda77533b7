"""The Hugging Face peer: our architecture as a `LlamaForCausalLM`, trained the plain way.

The throughput benchmark runs this model on the same shapes and batches as the megatron
engine, so "how fast is our engine" has a reference people know: SDPA attention, a fused
AdamW, parameters in the run's precision (pure bf16 for a bf16 config: no fp32 main copy,
which makes the peer lighter than our engine, not heavier), gradient accumulation over the
same microbatches, clipping at the config's norm.

Llama is RMSNorm, RoPE and a gated MLP. A config with LayerNorm still gets a peer (with
RMSNorm, noted in `peer_differences`: norms are not matmuls, so the FLOPs are the same and
the time differs by a few element-wise kernels); one with GeLU or learned positions is
refused, since Llama cannot express it and the comparison would be of different models.
The vocabulary is our padded size, so parameter counts agree exactly with ours for an
RMSNorm / SwiGLU / RoPE config.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_t2i.config import Config, ModelConfig


class PeerUnsupported(ValueError):
    """The config's architecture has no LlamaForCausalLM equivalent."""


def peer_differences(model_cfg: ModelConfig) -> list[str]:
    """Where the peer differs from our model; raises PeerUnsupported where it cannot match."""
    m = model_cfg
    if m.activation != "swiglu":
        raise PeerUnsupported(f"model.activation={m.activation!r}: Llama's MLP is gated "
                              f"(SwiGLU); the HF peer needs model.activation=swiglu")
    if m.position_embedding_type != "rope":
        raise PeerUnsupported(f"model.position_embedding_type={m.position_embedding_type!r}: "
                              f"Llama has RoPE only; the HF peer needs rope")
    notes = []
    if m.normalization != "RMSNorm":
        notes.append(f"normalization: ours {m.normalization}, peer RMSNorm (Llama has no "
                     f"LayerNorm); same matmul FLOPs, slightly different element-wise work "
                     f"and {2 * m.num_layers + 1} x hidden_size fewer parameters (no norm bias)")
    if m.hidden_dropout > 0:
        notes.append(f"hidden_dropout: ours {m.hidden_dropout}, peer 0 (Llama has none)")
    return notes


def llama_config(model_cfg: ModelConfig, padded_vocab_size: int) -> Any:
    """The LlamaConfig of our architecture (same layers, widths, heads, query groups, MLP
    width, padded vocabulary, RoPE base, norm epsilon, tying and biases)."""
    from transformers import LlamaConfig

    peer_differences(model_cfg)
    m = model_cfg
    return LlamaConfig(
        vocab_size=padded_vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.resolved_ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        head_dim=m.hidden_size // m.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=m.max_position_embeddings or m.seq_length,
        rms_norm_eps=m.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
        tie_word_embeddings=not m.untie_embeddings_and_output_weights,
        attention_bias=m.add_bias_linear,
        mlp_bias=m.add_bias_linear,
        attention_dropout=m.attention_dropout,
        initializer_range=m.init_method_std,
        use_cache=False,
    )


def build_llama(model_cfg: ModelConfig, padded_vocab_size: int, dtype: torch.dtype,
                device: torch.device | str) -> torch.nn.Module:
    """A randomly initialised LlamaForCausalLM with SDPA attention, on `device` in `dtype`
    (a "meta" device gives the shapes without memory, for counting)."""
    from transformers import AutoModelForCausalLM

    config = llama_config(model_cfg, padded_vocab_size)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                 dtype=dtype)
    return model.train()


def fused_adamw_supported(device: torch.device) -> bool:
    """torch's fused AdamW kernel exists for CUDA and, since torch 2.4, for the CPU."""
    probe = torch.zeros(1, device=device, requires_grad=True)
    try:
        torch.optim.AdamW([probe], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


class HFPeer:
    """One optimizer step of the peer = the same microbatches our engine takes per step."""

    def __init__(self, cfg: Config, padded_vocab_size: int, device: torch.device) -> None:
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.notes = peer_differences(cfg.model)
        self.model = build_llama(cfg.model, padded_vocab_size, dtype, device)
        o = cfg.optim
        fused = fused_adamw_supported(device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2),
            eps=o.adam_eps, weight_decay=o.weight_decay,
            **({"fused": True} if fused else {"foreach": True}))
        self.optimizer_name = f"torch.optim.AdamW({'fused' if fused else 'foreach'}=True)"
        self.clip_grad = o.clip_grad
        self.device = device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def train_step(self, microbatches: list[dict[str, torch.Tensor]]) -> float:
        """Gradient accumulation over `microbatches`, clipping, AdamW; returns the loss, a
        mean over every loss token of the step (as our engine's)."""
        targets = [torch.where(mb["loss_mask"] > 0, mb["labels"], -100) for mb in microbatches]
        loss_tokens = sum(int((t != -100).sum()) for t in targets)
        total = torch.zeros((), device=self.device)
        for mb, shift_labels in zip(microbatches, targets):
            # `shift_labels`: our labels are already the next tokens, so HF must not shift
            out = self.model(input_ids=mb["tokens"], labels=shift_labels,
                             shift_labels=shift_labels, num_items_in_batch=loss_tokens)
            out.loss.backward()
            total += out.loss.detach()  # no host sync inside the step
        if self.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total)
