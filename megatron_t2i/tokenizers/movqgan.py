"""SBER-MoVQGAN: the paper's image tokenizer (16,384 codes; 256x256 images -> 32x32 codes).

A VQGAN whose decoder normalises with "spatially conditioned" GroupNorm (MoVQ, Zheng et al.
2022): every decoder norm scales and shifts its features by 1x1 convolutions of the quantised
latent, resized to the feature map. The network is diffusers' `VQModel` with
`norm_type="spatial"` (the MoVQ Kandinsky uses), set up as each official configuration
(67M / 102M / 270M; `build_vqmodel`). Files keep the official state-dict names
(github.com/ai-forever/MoVQGAN; `movqgan_keys.py` lists every key and maps it onto diffusers'
names), so the released `movqgan_{67M,102M,270M}.ckpt` files load with strict key checking,
and `save` writes the official names back. Nothing is downloaded: the caller passes a local
path. docs/image-tokenizers.md says how the agreement with the official network is tested.

Encoding: pixels in [-1, 1] -> encoder -> quant_conv -> index of the nearest codebook row
(squared Euclidean distance, no normalisation; computed in fp32 even under bf16 autocast so
near ties do not flip). Decoding: codebook rows -> post_quant_conv -> decoder, conditioned on
the codebook rows themselves -> pixels -> uint8 (round, clamp).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from megatron_t2i.platform import resolve_device
from megatron_t2i.tokenizers.image import ImageTokenizer
from megatron_t2i.tokenizers.movqgan_keys import published_layout, to_diffusers, to_official


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


# ---- the network: diffusers' VQModel with spatial norm, under the official key names ------
def build_vqmodel(cfg: MoVQConfig) -> nn.Module:
    """diffusers' VQModel set up as the official MOVQ of `cfg` (random weights).

    Levels whose resolution is in `attn_resolutions` attend (AttnDown/AttnUp blocks); the
    decoder's norms are SpatialNorm conditioned on the codebook rows (`norm_type="spatial"`);
    `lookup_from_codebook` lets `decode` take code indices. tests/test_movqgan.py holds it
    against the official modules' layout and against our former hand-written network."""
    try:
        from diffusers.models.autoencoders.vq_model import VQModel
    except ImportError as e:
        raise ImportError(f"MoVQGAN needs diffusers ({e}); install it with "
                          f"pip install 'megatron_t2i[movqgan]'") from e

    attends = [cfg.resolution // 2**level in cfg.attn_resolutions
               for level in range(len(cfg.ch_mult))]
    return VQModel(
        in_channels=cfg.in_channels, out_channels=cfg.out_ch,
        down_block_types=[("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D")
                          for a in attends],
        up_block_types=[("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D")
                        for a in reversed(attends)],  # diffusers runs up blocks top-down
        block_out_channels=[cfg.ch * m for m in cfg.ch_mult],
        layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels,
        num_vq_embeddings=cfg.n_embed, vq_embed_dim=cfg.embed_dim, norm_num_groups=32,
        norm_type="spatial", sample_size=cfg.resolution, lookup_from_codebook=True)


def _codes(z: torch.Tensor, table: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """(B, C, h, w) -> int64 (B, h, w): argmin_j |z - e_j|^2 in fp32, `rows` latents at a
    time (bounds memory at rows x n_embed floats; diffusers' quantizer builds the whole
    distance matrix, 1 GiB for 16 images at 32 x 32 codes)."""
    b, c, h, w = z.shape
    flat = z.float().permute(0, 2, 3, 1).reshape(-1, c)
    table = table.float()
    e2 = (table**2).sum(1)
    out = torch.empty(len(flat), dtype=torch.int64, device=z.device)
    for s in range(0, len(flat), rows):
        x = flat[s:s + rows]
        out[s:s + rows] = ((x**2).sum(1, keepdim=True) + e2 - 2 * x @ table.T).argmin(1)
    return out.reshape(b, h, w)


def encode_codes(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, R, R) in [-1, 1] -> codes (B, g, g). The encoder may run under autocast;
    quant_conv and the distances run in fp32 so near ties do not flip."""
    h = model.encoder(x)
    with torch.autocast(x.device.type, enabled=False):
        return _codes(model.quant_conv(h.float()), model.quantize.embedding.weight)


def decode_codes(model: nn.Module, codes: torch.Tensor) -> torch.Tensor:
    """Codes (B, g, g) -> pixels (B, 3, R, R), about [-1, 1]: codebook rows ->
    post_quant_conv -> decoder conditioned on the rows (diffusers' VQModel.decode)."""
    b, g, _ = codes.shape
    shape = (b, g, g, model.config.vq_embed_dim)
    return model.decode(codes.reshape(b, -1), force_not_quantize=True, shape=shape).sample


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


def official_layout(cfg: MoVQConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official MOVQ state dict of `cfg` (movqgan_keys.py)."""
    return published_layout(dataclasses.asdict(cfg))


def _differences(state: dict[str, torch.Tensor], cfg: MoVQConfig) -> dict[str, list[str]]:
    """What keeps `state` (official names) from loading strictly: {} when it loads."""
    want = official_layout(cfg)
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

    def __init__(self, model: nn.Module, config: MoVQConfig,
                 device: str | torch.device | None = None, batch_size: int = 16,
                 name: str = "") -> None:
        """model: `build_vqmodel(config)` with its weights."""
        self.device = torch.device(device or resolve_device("auto"))
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.config = config
        self.batch_size = batch_size
        self.name = name
        self._identity: str | None = None

    @classmethod
    def from_config(cls, cfg: MoVQConfig | str, seed: int = 0, **kwargs) -> MoVQGAN:
        """Random weights (tests, benchmarks): a preset name or a config."""
        name = cfg if isinstance(cfg, str) else ""
        cfg = PRESETS[cfg] if isinstance(cfg, str) else cfg
        torch.manual_seed(seed)
        return cls(build_vqmodel(cfg), cfg, name=name, **kwargs)

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
            model = build_vqmodel(cfg)
        model = model.to_empty(device="cpu")  # no random init: every tensor is overwritten
        model.load_state_dict(to_diffusers(state, len(cfg.ch_mult)), strict=True)
        name = next((n for n, c in PRESETS.items() if c == cfg), "")
        return cls(model, cfg, device=device, batch_size=batch_size, name=name)

    def save(self, path: str | Path) -> None:
        """A .safetensors file with the weights under the official names and the config."""
        from safetensors.torch import save_file

        if Path(path).suffix != ".safetensors":  # from_checkpoint picks the reader by suffix
            raise ValueError(f"MoVQGAN.save: {path} must end in .safetensors")
        save_file(self.official_state_dict(), str(path),
                  metadata={"movqgan_config": self.config.to_json()})

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the official MOVQ names and shapes (CPU, contiguous)."""
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return {k: v.contiguous() for k, v in
                to_official(state, official_layout(self.config)).items()}

    # ---- the interface --------------------------------------------------------------------
    def encode(self, images: np.ndarray) -> np.ndarray:
        self._check_images(images)
        out = []
        for s in range(0, len(images), self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[s:s + self.batch_size]))
            x = batch.to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            with torch.inference_mode(), self._autocast():
                out.append(encode_codes(self.model, x).cpu())
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
                x = decode_codes(self.model, c).float()
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
            for k, v in sorted(self.official_state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
            self._identity = h.hexdigest()
        return self._identity


def count_parameters(cfg: MoVQConfig) -> int:
    """Parameters of the network of `cfg`, counted without allocating them."""
    return sum(math.prod(shape) for shape in official_layout(cfg).values())


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
