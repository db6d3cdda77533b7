"""Build the megatron-core GPTModel chunks of this rank.

One chunk per virtual pipeline stage (one without interleaving). The layer spec is
Transformer Engine's when TE is used, else the local spec with SDPA as core attention.

Initialisation is parallel-invariant: every parameter is drawn from a generator seeded by
(seed, parameter name, layer index) over its *global* (unsharded) shape and this rank keeps
its own slice, so the same seed gives the same model at any TP / PP / VPP.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_t2i.config import Config, uses_transformer_engine
from megatron_t2i.model.attention import SDPACoreAttention


def params_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


def transformer_config(cfg: Config, on_cuda: bool) -> TransformerConfig:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dtype = params_dtype(cfg)
    swiglu = m.activation == "swiglu"
    extra: dict[str, Any] = {}
    if t.fp8 is not None:
        extra.update(fp8=t.fp8, fp8_recipe="delayed")
    if t.recompute_granularity == "full":
        extra.update(recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1)
    elif t.recompute_granularity == "selective":
        extra.update(recompute_granularity="selective")
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.resolved_ffn_hidden_size,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        add_bias_linear=m.add_bias_linear,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        autocast_dtype=dtype,
        use_cpu_initialization=not on_cuda,
        # megatron's initialisation path also tags tensor-parallel parameters (which grad-norm
        # and the optimizers rely on); its draw is skipped since init_parameters() redraws all
        perform_initialization=True,
        init_method=_skip_init,
        output_layer_init_method=_skip_init,
        # fused kernels need CUDA (and apex / TE); the unfused paths are exact equivalents
        bias_activation_fusion=on_cuda and swiglu and not m.add_bias_linear,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=on_cuda,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        batch_p2p_comm=True,
        deallocate_pipeline_outputs=on_cuda,
        # the loss is a mean over all loss tokens of the global batch (training/loss.py);
        # DDP reads this at construction to sum rather than average across DP
        calculate_per_token_loss=True,
        qk_layernorm=m.qk_layernorm,
        **extra,
    )


def _skip_init(weight: torch.Tensor) -> None:
    """Leaves the weight as allocated: init_parameters() draws every parameter."""


def layer_spec(cfg: Config) -> ModuleSpec:
    m = cfg.model
    if uses_transformer_engine(cfg):
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec(normalization=m.normalization,
                                                          qk_layernorm=m.qk_layernorm)
    spec = get_gpt_layer_local_spec(normalization=m.normalization,
                                    qk_layernorm=m.qk_layernorm)
    if m.core_attention == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def build_model_chunks(cfg: Config, padded_vocab_size: int,
                       on_cuda: bool) -> list[GPTModel | Float16Module]:
    """This rank's model chunks, initialised from cfg.train.seed, on the platform's device."""
    tcfg = transformer_config(cfg, on_cuda)
    spec = layer_spec(cfg)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = GPTModel(
            config=tcfg,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab_size,
            max_sequence_length=cfg.model.max_position_embeddings or cfg.model.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                               vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                               vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=not cfg.model.untie_embeddings_and_output_weights,
            position_embedding_type=cfg.model.position_embedding_type,
            rotary_base=cfg.model.rotary_base,
            vp_stage=stage,
        )
        if on_cuda:
            model.cuda(torch.cuda.current_device())
        if tcfg.bf16:
            # as Megatron-LM: every parameter (norms included) in bf16, fp32 logits out; the
            # optimizer keeps fp32 main parameters
            model = Float16Module(tcfg, model)
        chunks.append(model)
    init_parameters(chunks, cfg)
    return chunks


# ---- parallel-invariant initialisation ------------------------------------------------------

def init_parameters(chunks: list[torch.nn.Module], cfg: Config) -> None:
    """Draw every parameter as if the model were unsharded, keep this rank's slice.

    Same rules as megatron-core's defaults: norms to one, biases to zero, output projections
    of each layer (linear_proj, linear_fc2) normal(0, std / sqrt(2 x num_layers)), everything
    else normal(0, std). Walks the sharded state dict, whose keys are global layer names and
    whose offsets say where this rank's slice sits in the global tensor.
    """
    std = cfg.model.init_method_std
    scaled_std = std / math.sqrt(2.0 * cfg.model.num_layers)
    with torch.no_grad():
        for chunk in chunks:
            sharded = chunk.sharded_state_dict(prefix="")
            apply_factories(sharded)
            filled = set()
            for st in _sharded_tensors(sharded):
                if st.key.endswith("_extra_state") or not st.data.is_floating_point():
                    continue
                _fill_slice(st, cfg.train.seed, _init_kind(st.key), std, scaled_std)
                filled.add(st.data.untyped_storage().data_ptr())
            for name, param in chunk.named_parameters():
                if param.untyped_storage().data_ptr() not in filled:
                    raise RuntimeError(f"init_parameters: {name} is not in the sharded state "
                                       f"dict, so it would keep uninitialised memory")


def _sharded_tensors(tree: Any):
    if isinstance(tree, ShardedTensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _sharded_tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _sharded_tensors(v)


def _init_kind(key: str) -> str:
    name = key.rsplit(".", 1)[-1]
    if "norm" in key and name in ("weight", "layer_norm_weight"):
        return "ones"
    if name.endswith("bias"):
        return "zeros"
    if "linear_proj" in key or "linear_fc2" in key:
        return "scaled_normal"
    return "normal"


def _fill_slice(st: ShardedTensor, seed: int, kind: str, std: float, scaled_std: float) -> None:
    if kind == "ones":
        st.data.fill_(1.0)
        return
    if kind == "zeros":
        st.data.zero_()
        return
    n_pre = st.prepend_axis_num
    layer_index = tuple(st.global_offset[:n_pre])
    global_shape = st.global_shape[n_pre:]
    digest = hashlib.sha256(f"{seed}|{st.key}|{layer_index}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % (2**63))
    full = torch.empty(global_shape, dtype=torch.float32)
    full.normal_(0.0, scaled_std if kind == "scaled_normal" else std, generator=gen)
    index = tuple(slice(o, o + n) for o, n in zip(st.global_offset[n_pre:], st.data.shape))
    st.data.copy_(full[index].to(st.data.dtype))
