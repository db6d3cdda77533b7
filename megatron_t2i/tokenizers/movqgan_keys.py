"""The published SBER-MoVQGAN state-dict layout: every key and its shape, per preset, and the
map of each key onto diffusers' VQModel.

Why a listing: `movqgan.py` runs diffusers' network, whose names differ, yet must load the
official checkpoints with strict key checking and write the official names back. This file is
what a file is checked against (every key, every shape) and how it is renamed; the tests hold
diffusers' model and the official modules (tests/movqgan_reference.py) against it. It does not
import `movqgan.py`.

Source (read 2026-11, github.com/ai-forever/MoVQGAN, commit f3976d8):
- configs: `movqgan/__init__.py` (MODELS: the `ddconfig`, `n_embed`, `embed_dim` of 67M, 102M,
  270M) and `configs/movqgan_{67M,102M,270M}.yaml` (the same values);
- top-level names: `movqgan/models/vqgan.py` class MOVQ (`encoder`, `decoder`, `quantize`,
  `quant_conv`, `post_quant_conv`; the `loss` and `ema_*` members exist only in training);
- encoder: `movqgan/modules/vqvae/vqvae_blocks.py` Encoder/ResnetBlock/AttnBlock/Downsample
  (GroupNorm norms; `temb_ch = 0`, so no `temb_proj`);
- decoder: `movqgan/modules/vqvae/movq_modules.py` MOVQDecoder with SpatialNorm
  (`norm_layer`, `conv_y`, `conv_b`; `add_conv=False`, so no `conv`);
- quantizer: `movqgan/modules/vqvae/quantize.py` VectorQuantizer2 (`embedding`, nn.Embedding;
  no `used` buffer since `remap=None`).
Cross-checked against diffusers' `scripts/convert_kandinsky_to_diffusers.py`, which reads each of
these names from Kandinsky 2.1's `movq_final.ckpt` (the 67M architecture) as a plain top-level
state dict.
"""

from __future__ import annotations

import re

import torch

Shape = tuple[int, ...]

# ddconfig + n_embed + embed_dim of movqgan/__init__.py MODELS (all three share the rest).
_COMMON = {"resolution": 256, "in_channels": 3, "out_ch": 3, "z_channels": 4,
           "ch_mult": (1, 2, 2, 4), "attn_resolutions": (32,), "embed_dim": 4,
           "n_embed": 16384}
PUBLISHED_CONFIGS: dict[str, dict] = {
    "67M": {**_COMMON, "ch": 128, "num_res_blocks": 2},
    "102M": {**_COMMON, "ch": 128, "num_res_blocks": 4},
    "270M": {**_COMMON, "ch": 256, "num_res_blocks": 2},
}


def _conv(keys: dict[str, Shape], name: str, cin: int, cout: int, k: int) -> None:
    keys[f"{name}.weight"] = (cout, cin, k, k)
    keys[f"{name}.bias"] = (cout,)


def _norm(keys: dict[str, Shape], name: str, c: int, zq_ch: int | None) -> None:
    if zq_ch is None:  # GroupNorm(32, c)
        keys[f"{name}.weight"] = (c,)
        keys[f"{name}.bias"] = (c,)
        return
    keys[f"{name}.norm_layer.weight"] = (c,)  # SpatialNorm
    keys[f"{name}.norm_layer.bias"] = (c,)
    _conv(keys, f"{name}.conv_y", zq_ch, c, 1)
    _conv(keys, f"{name}.conv_b", zq_ch, c, 1)


def _resnet(keys: dict[str, Shape], name: str, cin: int, cout: int, zq_ch: int | None) -> None:
    _norm(keys, f"{name}.norm1", cin, zq_ch)
    _conv(keys, f"{name}.conv1", cin, cout, 3)
    _norm(keys, f"{name}.norm2", cout, zq_ch)
    _conv(keys, f"{name}.conv2", cout, cout, 3)
    if cin != cout:
        _conv(keys, f"{name}.nin_shortcut", cin, cout, 1)


def _attn(keys: dict[str, Shape], name: str, c: int, zq_ch: int | None) -> None:
    _norm(keys, f"{name}.norm", c, zq_ch)
    for proj in ("q", "k", "v", "proj_out"):
        _conv(keys, f"{name}.{proj}", c, c, 1)


def _mid(keys: dict[str, Shape], name: str, c: int, zq_ch: int | None) -> None:
    _resnet(keys, f"{name}.block_1", c, c, zq_ch)
    _attn(keys, f"{name}.attn_1", c, zq_ch)
    _resnet(keys, f"{name}.block_2", c, c, zq_ch)


def _encoder(keys: dict[str, Shape], cfg: dict) -> None:
    ch, mult, n = cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"]
    _conv(keys, "encoder.conv_in", cfg["in_channels"], ch, 3)
    res, block_in = cfg["resolution"], ch
    for level, m in enumerate(mult):
        for i in range(n):
            _resnet(keys, f"encoder.down.{level}.block.{i}", block_in, ch * m, None)
            block_in = ch * m
            if res in cfg["attn_resolutions"]:
                _attn(keys, f"encoder.down.{level}.attn.{i}", block_in, None)
        if level != len(mult) - 1:
            _conv(keys, f"encoder.down.{level}.downsample.conv", block_in, block_in, 3)
            res //= 2
    _mid(keys, "encoder.mid", block_in, None)
    _norm(keys, "encoder.norm_out", block_in, None)
    _conv(keys, "encoder.conv_out", block_in, cfg["z_channels"], 3)  # double_z: false


def _decoder(keys: dict[str, Shape], cfg: dict) -> None:
    ch, mult, n, zq = cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"], cfg["embed_dim"]
    block_in = ch * mult[-1]
    res = cfg["resolution"] // 2 ** (len(mult) - 1)
    _conv(keys, "decoder.conv_in", cfg["z_channels"], block_in, 3)
    _mid(keys, "decoder.mid", block_in, zq)
    for level in reversed(range(len(mult))):  # the official loop order; names keep the level
        for i in range(n + 1):
            _resnet(keys, f"decoder.up.{level}.block.{i}", block_in, ch * mult[level], zq)
            block_in = ch * mult[level]
            if res in cfg["attn_resolutions"]:
                _attn(keys, f"decoder.up.{level}.attn.{i}", block_in, zq)
        if level != 0:
            _conv(keys, f"decoder.up.{level}.upsample.conv", block_in, block_in, 3)
            res *= 2
    _norm(keys, "decoder.norm_out", block_in, zq)
    _conv(keys, "decoder.conv_out", block_in, cfg["out_ch"], 3)


def published_layout(cfg: dict) -> dict[str, Shape]:
    """Key -> shape of the official MOVQ state dict for one ddconfig (+ n_embed, embed_dim)."""
    keys: dict[str, Shape] = {}
    _encoder(keys, cfg)
    _decoder(keys, cfg)
    keys["quantize.embedding.weight"] = (cfg["n_embed"], cfg["embed_dim"])
    _conv(keys, "quant_conv", cfg["z_channels"], cfg["embed_dim"], 1)
    _conv(keys, "post_quant_conv", cfg["embed_dim"], cfg["z_channels"], 1)
    return keys


# ---- the key map onto diffusers' VQModel (norm_type="spatial") ---------------------------
# diffusers names the same modules differently and runs the decoder's levels top-down
# (up_blocks.0 is the official up.{n-1}); attention projections are nn.Linear there and 1x1
# convolutions in the official files. Facts from diffusers 0.42 `models/autoencoders/vae.py`
# (Encoder, Decoder), `unets/unet_2d_blocks.py` and `attention_processor.py` (Attention with
# group_norm / spatial_norm).
_ATTENTION = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LINEAR = re.compile(r"\.to_(q|k|v|out\.0)\.weight$")


def _level_key(side: str, rest: str, n_levels: int) -> str:
    m = re.match(r"(down|up)\.(\d+)\.(block|attn|downsample|upsample)\.(.*)$", rest)
    if not m:
        return rest
    level = int(m[2]) if side == "encoder" else n_levels - 1 - int(m[2])
    member = {"block": "resnets.", "attn": "attentions.", "downsample": "downsamplers.0.",
              "upsample": "upsamplers.0."}[m[3]]
    return f"{m[1]}_blocks.{level}.{member}{m[4]}"


def diffusers_key(key: str, n_levels: int) -> str:
    """The diffusers VQModel name of one official MOVQ key."""
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key  # quantize.embedding, quant_conv, post_quant_conv: same names
    rest = _level_key(side, rest, n_levels)
    for old, new in (("mid.block_1.", "mid_block.resnets.0."),
                     ("mid.block_2.", "mid_block.resnets.1."),
                     ("mid.attn_1.", "mid_block.attentions.0."),
                     (".nin_shortcut.", ".conv_shortcut.")):
        rest = rest.replace(old, new)
    rest = re.sub(r"^norm_out\.", "conv_norm_out.", rest)
    if "attentions." in rest:
        norm = ".group_norm." if side == "encoder" else ".spatial_norm."
        rest = re.sub(r"\.norm\.", norm, rest)
        rest = re.sub(r"\.(q|k|v|proj_out)\.(weight|bias)$",
                      lambda m: f".{_ATTENTION[m[1]]}.{m[2]}", rest)
    return f"{side}.{rest}"


def to_diffusers(state: dict[str, torch.Tensor], n_levels: int) -> dict[str, torch.Tensor]:
    """An official state dict under diffusers' names (1x1-conv projections as matrices)."""
    out = {}
    for key, value in state.items():
        new = diffusers_key(key, n_levels)
        out[new] = value.flatten(1) if _LINEAR.search(new) else value
    return out


def to_official(state: dict[str, torch.Tensor],
                layout: dict[str, Shape]) -> dict[str, torch.Tensor]:
    """The inverse of `to_diffusers` for a model of `layout` (published_layout's output)."""
    n_levels = 1 + max(int(k.split(".")[2]) for k in layout if k.startswith("encoder.down."))
    names = {diffusers_key(k, n_levels): k for k in layout}
    return {names[k]: v.reshape(layout[names[k]]) for k, v in state.items()}
