"""SBER-MoVQGAN: the paper's image tokenizer (16,384 codes; 256x256 images -> 32x32 codes).

A VQGAN whose decoder normalises with "spatially conditioned" GroupNorm (MoVQ, Zheng et al.
2022): every decoder norm scales and shifts its features by 1x1 convolutions of the quantised
latent, resized to the feature map. Written from the published architecture
(github.com/ai-forever/MoVQGAN, see `movqgan_keys.py` for the files read); the module tree
reproduces the official state-dict names, so the released `movqgan_{67M,102M,270M}.ckpt` files
load with strict key checking. Nothing is downloaded: the caller passes a local path.

Encoding: pixels in [-1, 1] -> encoder -> quant_conv -> index of the nearest codebook row
(squared Euclidean distance, no normalisation; computed in fp32 even under bf16 autocast so
near ties do not flip). Decoding: codebook rows -> post_quant_conv -> decoder, conditioned on
the codebook rows themselves -> pixels -> uint8 (round, clamp).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from megatron_t2i.tokenizers.image import ImageTokenizer


@dataclass(frozen=True)
class MoVQConfig:
    """The official `ddconfig` plus the codebook (`n_embed` codes of `embed_dim`)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (32,)
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 4
    embed_dim: int = 4
    n_embed: int = 16384

    @property
    def grid_size(self) -> int:
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MoVQConfig:
        raw = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


PRESETS: dict[str, MoVQConfig] = {
    "67M": MoVQConfig(ch=128, num_res_blocks=2),
    "102M": MoVQConfig(ch=128, num_res_blocks=4),
    "270M": MoVQConfig(ch=256, num_res_blocks=2),
}

# Members of the official training module (vqgan.py MOVQ) that a checkpoint may carry but that
# inference does not use: the LPIPS + discriminator loss and the LitEma shadow copies. They are
# dropped before the strict key check; any other unknown key is an error. The official loader
# (movqgan.get_movqgan_model) also uses the non-EMA weights.
TRAINING_ONLY_PREFIXES = ("loss.", "ema_encoder.", "ema_decoder.", "ema_quantize.",
                          "ema_quant_conv.", "ema_post_quant_conv.")


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


# ---- checkpoint files -------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], MoVQConfig | None]:
    """The tensors of a .safetensors file or a torch file (plain state dict, or nested under
    "state_dict" / "model"), read without unpickling code, and the config our `save` wrote."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MoVQGAN checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        cfg = meta.get("movqgan_config")
        return state, MoVQConfig.from_json(cfg) if cfg else None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled objects other than tensors and containers
        raise ValueError(f"MoVQGAN checkpoint {path}: not a weights-only torch file ({e}); "
                         f"save its state dict alone (torch.save(model.state_dict(), ...))"
                         ) from e
    for nest in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(nest), dict):
            obj = obj[nest]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"MoVQGAN checkpoint {path}: expected a state dict of tensors")
    return obj, None


def _layout(cfg: MoVQConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in MoVQ(cfg).state_dict().items()}


def _differences(state: dict[str, torch.Tensor], cfg: MoVQConfig) -> dict[str, list[str]]:
    """What keeps `state` from loading strictly into MoVQ(cfg): {} when it loads."""
    want = _layout(cfg)
    found = {
        "missing keys": sorted(set(want) - set(state)),
        "unexpected keys": sorted(set(state) - set(want)),
        "shape mismatches (file vs model)": [
            f"{k} {tuple(state[k].shape)} vs {want[k]}"
            for k in sorted(set(want) & set(state)) if tuple(state[k].shape) != want[k]],
    }
    return {label: items for label, items in found.items() if items}


def _describe(differences: dict[str, list[str]], shown: int = 8) -> str:
    parts = []
    for label, items in differences.items():
        more = f" ... and {len(items) - shown} more" if len(items) > shown else ""
        parts.append(f"{label} ({len(items)}): {', '.join(items[:shown])}{more}")
    return "; ".join(parts)


def _resolve_config(state: dict[str, torch.Tensor],
                    preset: str | MoVQConfig | None) -> tuple[MoVQConfig, str]:
    """The config to load into, and how it was chosen (for error messages)."""
    if isinstance(preset, MoVQConfig):
        return preset, "the given config"
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"MoVQGAN: unknown preset {preset!r}; known: {sorted(PRESETS)}")
        return PRESETS[preset], f"preset {preset}"
    # No preset: the nearest published layout (exact for an intact official file).
    distance = {name: sum(map(len, _differences(state, cfg).values()))
                for name, cfg in PRESETS.items()}
    best = min(distance, key=distance.get)
    return PRESETS[best], f"preset {best} (the nearest published layout)"


# ---- the tokenizer ----------------------------------------------------------------------
class MoVQGAN(ImageTokenizer):
    """MoVQGAN behind the ImageTokenizer interface: batched, bf16 autocast on CUDA."""

    def __init__(self, model: MoVQ, device: str | torch.device | None = None,
                 batch_size: int = 16, name: str = "") -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.config = model.config
        self.batch_size = batch_size
        self.name = name
        self._identity: str | None = None

    @classmethod
    def from_config(cls, cfg: MoVQConfig | str, seed: int = 0, **kwargs) -> MoVQGAN:
        """Random weights (tests, benchmarks): a preset name or a config."""
        name = cfg if isinstance(cfg, str) else ""
        cfg = PRESETS[cfg] if isinstance(cfg, str) else cfg
        torch.manual_seed(seed)
        return cls(MoVQ(cfg), name=name, **kwargs)

    @classmethod
    def from_checkpoint(cls, path: str | Path, preset: str | MoVQConfig | None = None,
                        device: str | torch.device | None = None,
                        batch_size: int = 16) -> MoVQGAN:
        """Load an official `movqgan_*.ckpt` (or our `save`). preset: "67M" | "102M" | "270M"
        | a MoVQConfig | None (the config `save` recorded, else inferred from the keys).
        Every model key must be present with its shape and no other key may remain once the
        training-only members (TRAINING_ONLY_PREFIXES) are dropped."""
        path = Path(path)
        state, saved_cfg = read_checkpoint(path)
        state = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
        cfg, source = _resolve_config(state, preset if preset is not None else saved_cfg)
        problems = _differences(state, cfg)
        if problems:
            raise ValueError(f"MoVQGAN checkpoint {path} does not match {source}: "
                             f"{_describe(problems)}")
        with torch.device("meta"):
            model = MoVQ(cfg)
        model = model.to_empty(device="cpu")  # no random init: every tensor is overwritten
        model.load_state_dict(state, strict=True)
        name = next((n for n, c in PRESETS.items() if c == cfg), "")
        return cls(model, device=device, batch_size=batch_size, name=name)

    def save(self, path: str | Path) -> None:
        """A .safetensors file with the weights under the official names and the config."""
        from safetensors.torch import save_file

        if Path(path).suffix != ".safetensors":  # from_checkpoint picks the reader by suffix
            raise ValueError(f"MoVQGAN.save: {path} must end in .safetensors")
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(path), metadata={"movqgan_config": self.config.to_json()})

    # ---- the interface --------------------------------------------------------------------
    def encode(self, images: np.ndarray) -> np.ndarray:
        self._check_images(images)
        out = []
        for s in range(0, len(images), self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[s:s + self.batch_size]))
            x = batch.to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            with torch.inference_mode(), self._autocast():
                out.append(self.model.encode_codes(x).cpu())
        g = self.grid_size
        return torch.cat(out).numpy() if out else np.zeros((0, g, g), np.int64)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        g = self.grid_size
        if codes.ndim != 3 or codes.shape[1:] != (g, g) or not np.issubdtype(codes.dtype,
                                                                               np.integer):
            raise ValueError(f"MoVQGAN: expected integer codes (N, {g}, {g}), got "
                             f"{codes.dtype} {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"MoVQGAN: codes outside [0, {self.codebook_size})")
        out = []
        for s in range(0, len(codes), self.batch_size):
            c = torch.from_numpy(codes[s:s + self.batch_size].astype(np.int64)).to(self.device)
            with torch.inference_mode(), self._autocast():
                x = self.model.decode_codes(c).float()
            pixels = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
            out.append(pixels.permute(0, 2, 3, 1).cpu())
        r = self.image_size
        return torch.cat(out).numpy() if out else np.zeros((0, r, r, 3), np.uint8)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @property
    def codebook_size(self) -> int:
        return self.config.n_embed

    @property
    def image_size(self) -> int:
        return self.config.resolution

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    def identity(self) -> str:
        """sha256 of the config and every weight (fp32). Equal images give equal codes at the
        same device, precision and batch size; otherwise rounding may flip a latent that is
        nearly tied between two codebook rows (bf16 autocast on a GPU flips more)."""
        if self._identity is None:
            h = hashlib.sha256(f"movqgan:{self.config.to_json()}:".encode())
            for k, v in sorted(self.model.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
            self._identity = h.hexdigest()
        return self._identity


def count_parameters(cfg: MoVQConfig) -> int:
    """Parameters of MoVQ(cfg), counted without allocating them."""
    with torch.device("meta"):
        return sum(p.numel() for p in MoVQ(cfg).parameters())


def throughput(tokenizer: MoVQGAN, batch: int, repeats: int = 3, seed: int = 0) -> dict:
    """Images per second of encode and of decode on random images (best of `repeats`, after
    one warm-up pass), for tools/bench_movqgan.py."""
    rng = np.random.default_rng(seed)
    r = tokenizer.image_size
    images = rng.integers(0, 256, (batch, r, r, 3), dtype=np.uint8)
    result = {}
    for label, fn, arg in (("encode", tokenizer.encode, images),
                           ("decode", tokenizer.decode, tokenizer.encode(images))):
        fn(arg)  # warm-up (cuDNN autotune, allocator)
        best = float("inf")
        for _ in range(repeats):
            if tokenizer.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn(arg)
            if tokenizer.device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        result[f"{label}_images_per_s"] = batch / best
    return result
