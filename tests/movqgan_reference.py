"""The official MoVQGAN network written out from its published architecture, as the reference
tests/test_movqgan.py holds diffusers' VQModel against (the project's own implementation
until diffusers replaced it; see docs/image-tokenizers.md).

Written from github.com/ai-forever/MoVQGAN (movqgan/modules/vqvae/vqvae_blocks.py: Encoder,
ResnetBlock, AttnBlock, Downsample; movq_modules.py: MOVQDecoder, SpatialNorm;
quantize.py: VectorQuantizer2; models/vqgan.py: MOVQ). The module tree reproduces the official
state-dict names, so a state dict in the official layout loads into it strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_t2i.tokenizers.movqgan import MoVQConfig


# ---- building blocks (names follow the official modules) ---------------------------------
class GroupNorm(nn.GroupNorm):
    """GroupNorm(32, c, eps=1e-6) that accepts (and ignores) the decoder's conditioning."""

    def __init__(self, channels: int) -> None:
        super().__init__(num_groups=32, num_channels=channels, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class SpatialNorm(nn.Module):
    """MoVQ's norm: GroupNorm(x) * conv_y(zq) + conv_b(zq), zq resized (nearest) to x."""

    def __init__(self, channels: int, zq_channels: int) -> None:
        super().__init__()
        self.norm_layer = GroupNorm(channels)
        self.conv_y = nn.Conv2d(zq_channels, channels, 1)
        self.conv_b = nn.Conv2d(zq_channels, channels, 1)

    def forward(self, x: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        zq = F.interpolate(zq, size=x.shape[-2:], mode="nearest")
        return self.norm_layer(x) * self.conv_y(zq) + self.conv_b(zq)


def _norm(channels: int, zq_channels: int | None) -> nn.Module:
    return GroupNorm(channels) if zq_channels is None else SpatialNorm(channels, zq_channels)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, zq_channels: int | None) -> None:
        super().__init__()
        self.norm1 = _norm(cin, zq_channels)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, zq_channels)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, zq)))
        h = self.conv2(F.silu(self.norm2(h, zq)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with 1x1-conv projections."""

    def __init__(self, channels: int, zq_channels: int | None) -> None:
        super().__init__()
        self.norm = _norm(channels, zq_channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x, zq)
        q, k, v = (p(hn).reshape(b, 1, c, h * w).transpose(2, 3) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (b, 1, hw, c); scale c**-0.5
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as the original


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution: `block` (resnets), `attn` (empty unless the resolution attends) and
    `downsample`/`upsample` except at the last level."""

    def __init__(self, channels: list[tuple[int, int]], attends: bool,
                 zq_channels: int | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o, zq_channels) for i, o in channels)
        self.attn = nn.ModuleList(AttnBlock(o, zq_channels) for _, o in channels if attends)

    def forward(self, h: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h, zq)
            if len(self.attn):
                h = self.attn[i](h, zq)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, zq_channels: int | None) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, zq_channels)
        self.attn_1 = AttnBlock(channels, zq_channels)
        self.block_2 = ResnetBlock(channels, channels, zq_channels)

    def forward(self, h: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h, zq), zq), zq)


class Encoder(nn.Module):
    """Image (B, 3, R, R) -> latent (B, z_channels, R/f, R/f), f = 2**(len(ch_mult)-1)."""

    def __init__(self, cfg: MoVQConfig) -> None:
        super().__init__()
        ch, n_levels = cfg.ch, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(cfg.ch_mult):
            pairs = [(block_in if i == 0 else ch * mult, ch * mult)
                     for i in range(cfg.num_res_blocks)]
            down = _Level(pairs, cfg.resolution // 2**level in cfg.attn_resolutions, None)
            block_in = ch * mult
            if level != n_levels - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = _Mid(block_in, None)
        self.norm_out = GroupNorm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for down in self.down:
            h = down(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class MoVQDecoder(nn.Module):
    """Latent (B, z_channels, g, g) + quantised codes zq (B, embed_dim, g, g) -> image."""

    def __init__(self, cfg: MoVQConfig) -> None:
        super().__init__()
        ch, mult, zq = cfg.ch, cfg.ch_mult, cfg.embed_dim
        top = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, top, 3, padding=1)
        self.mid = _Mid(top, zq)
        self.up = nn.ModuleList()  # indexed by level, run from the top level down
        for level in range(len(mult)):
            block_in = ch * mult[min(level + 1, len(mult) - 1)]
            pairs = [(block_in if i == 0 else ch * mult[level], ch * mult[level])
                     for i in range(cfg.num_res_blocks + 1)]
            up = _Level(pairs, cfg.resolution // 2**level in cfg.attn_resolutions, zq)
            if level != 0:
                up.upsample = Upsample(ch * mult[level])
            self.up.append(up)
        self.norm_out = SpatialNorm(ch * mult[0], zq)
        self.conv_out = nn.Conv2d(ch * mult[0], cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z), zq)
        for up in reversed(self.up):
            h = up(h, zq)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h, zq)))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour lookup in `embedding` (n_embed x embed_dim)."""

    _ROWS = 4096  # latent vectors per distance matrix: bounds memory at 4096 x n_embed floats

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> int64 (B, h, w): argmin_j |z - e_j|^2, in fp32."""
        b, c, h, w = z.shape
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, c)
        table = self.embedding.weight.float()
        e2 = (table**2).sum(1)
        out = torch.empty(len(flat), dtype=torch.int64, device=z.device)
        for s in range(0, len(flat), self._ROWS):
            x = flat[s:s + self._ROWS]
            d = (x**2).sum(1, keepdim=True) + e2 - 2 * x @ table.T  # the original's formula
            out[s:s + self._ROWS] = d.argmin(1)
        return out.reshape(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """int (B, h, w) -> (B, embed_dim, h, w)."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()


class MoVQ(nn.Module):
    """The official MOVQ's inference members, under the official names."""

    def __init__(self, cfg: MoVQConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = MoVQDecoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, R, R) in [-1, 1] -> codes (B, g, g). The conv stack may run under
        autocast; quant_conv and the distances run in fp32."""
        h = self.encoder(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.quantize.codes(self.quant_conv(h.float()))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, g, g) -> pixels (B, 3, R, R), about [-1, 1]."""
        zq = self.quantize.lookup(codes)
        return self.decoder(self.post_quant_conv(zq), zq)
