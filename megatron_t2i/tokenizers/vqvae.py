"""A small convolutional VQ autoencoder: a learned image tokenizer trained on a CPU.

    from megatron_t2i.tokenizers import vqvae
    model = vqvae.train_vqvae(images, codebook_size=256, downsample=4, steps=300,
                              batch_size=64, seed=0, cache=Path("vq.safetensors"))
    vqvae.save_vqvae(model, Path("vq.safetensors"))   # + vq.json (config, training record)
    tok = vqvae.VQVAETokenizer.load("vq.safetensors")  # = load_image_tokenizer("vqvae", path)
    codes = tok.encode(images)                          # uint8 (N, 64, 64, 3) -> (N, 16, 16)
    vqvae.reconstruction_mse(tok, images), vqvae.codebook_usage(tok, images)

The same layout as VQ-VAE / VQGAN at a miniature scale: a strided-convolution encoder maps a
64x64 RGB image to a grid of `code_dim` vectors (downsample 4 -> 16x16, 8 -> 8x8), each
replaced by its nearest codebook entry; a transposed-convolution decoder maps the quantized
grid back to pixels. Training minimises pixel MSE plus the commitment loss, with the
straight-through estimator for the encoder's gradient. The codebook is not trained by
gradients but as exponential moving averages of the vectors assigned to each code (VQ-VAE-2's
EMA update), initialised from encoder outputs, and a code unused for a while is restarted
at a random encoder output of the current batch (so few codes stay dead).

Weights are stored with safetensors, the architecture and training record in a JSON file
beside them (`<path without suffix>.json`); nothing loaded runs code. `train_vqvae(...,
cache=path)` reuses a saved model whose record shows the same training images (by content
hash) and settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from megatron_t2i.tokenizers.image import ImageTokenizer

_FORMAT = 1  # bump when the architecture or the training recipe changes (invalidates caches)
_EMA_DECAY = 0.99
_COMMITMENT = 0.25
_RESTART_EVERY = 25  # steps between dead-code restarts
_ENCODE_BATCH = 256


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    image_size: int = 64
    downsample: int = 4  # a power of two: each stride-2 stage halves the side
    codebook_size: int = 256
    code_dim: int = 16
    width: int = 32  # channels after the first stage; doubled by the second

    def __post_init__(self) -> None:
        stages = self.downsample.bit_length() - 1
        if self.downsample < 2 or 1 << stages != self.downsample:
            raise ValueError(f"vqvae: downsample={self.downsample} must be a power of two >= 2")
        if self.image_size % self.downsample:
            raise ValueError(f"vqvae: image_size={self.image_size} is not a multiple of "
                             f"downsample={self.downsample}")
        if self.codebook_size < 2 or self.code_dim < 1 or self.width < 1:
            raise ValueError(f"vqvae: codebook_size, code_dim and width must be positive "
                             f"(got {self.codebook_size}, {self.code_dim}, {self.width})")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample


class VQVAE(nn.Module):
    """Encoder, codebook (a buffer updated by EMA while training) and decoder."""

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        self.config = config
        stages = config.downsample.bit_length() - 1
        chans = [3] + [config.width * min(2 ** i, 2) for i in range(stages)]  # 3, w, 2w, 2w..
        enc: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            enc += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
        enc += [nn.Conv2d(chans[-1], chans[-1], 3, padding=1), nn.ReLU(),
                nn.Conv2d(chans[-1], config.code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(config.code_dim, chans[-1], 3, padding=1), nn.ReLU()]
        back = chans[::-1]
        for i, (cin, cout) in enumerate(zip(back[:-1], back[1:])):
            dec.append(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1))
            if i < stages - 1:
                dec.append(nn.ReLU())
        self.decoder = nn.Sequential(*dec)
        self.register_buffer("codebook", torch.zeros(config.codebook_size, config.code_dim))
        self.training_record: dict[str, Any] = {}  # saved beside the weights
        self.from_cache = False  # train_vqvae found it saved instead of training it

    # ---- pixels <-> codes -------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) in [-1, 1] -> (encoder output (B, D, h, w), codes (B, h, w))."""
        z = self.encoder(x)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, D)
        dist = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.T
                + self.codebook.pow(2).sum(1)[None, :])
        codes = dist.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])
        return z, codes

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> images (B, 3, H, W) in about [-1, 1]."""
        return self.decoder(self.codebook[codes].permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction (straight-through), commitment loss, codes and encoder output."""
        z, codes = self.encode(x)
        zq = self.codebook[codes].permute(0, 3, 1, 2)
        commitment = F.mse_loss(z, zq.detach())
        zq = z + (zq - z).detach()  # straight-through: the decoder's gradient reaches z
        return self.decoder(zq), commitment, codes, z


# ---- training ---------------------------------------------------------------------------

def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def training_key(images: np.ndarray, settings: dict[str, Any]) -> str:
    """A hash of the training images' bytes and every setting that changes the result."""
    h = hashlib.sha256(json.dumps({**settings, "format": _FORMAT}, sort_keys=True).encode())
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


def train_vqvae(images: np.ndarray, *, codebook_size: int, downsample: int, steps: int,
                batch_size: int, seed: int, code_dim: int = 16, width: int = 32,
                lr: float = 2e-3, cache: Path | None = None, log_every: int = 0) -> VQVAE:
    """Train on uint8 images (N, S, S, 3). With `cache`, a model saved there from the same
    images and settings is loaded instead of trained (and a new one is saved there)."""
    if images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2] \
            or images.dtype != np.uint8:
        raise ValueError(f"train_vqvae: expected uint8 images (N, S, S, 3), got "
                         f"{images.dtype} {tuple(images.shape)}")
    config = VQVAEConfig(images.shape[1], downsample, codebook_size, code_dim, width)
    # the thread count too: other threads sum in another order and train another codebook
    settings = {**dataclasses.asdict(config), "steps": steps, "batch_size": batch_size,
                "seed": seed, "lr": lr, "threads": torch.get_num_threads()}
    key = training_key(images, settings)
    if cache is not None and _record(Path(cache)).get("training_key") == key:
        model = load_vqvae(Path(cache))
        model.from_cache = True
        return model
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = VQVAE(config)
    start, cpu = time.perf_counter(), time.process_time()
    losses = _fit(model, images, steps, batch_size, lr, rng, log_every)
    model.training_record = {"training_key": key, "settings": settings,
                             "train_images": int(len(images)),
                             "train_seconds": round(time.perf_counter() - start, 2),
                             "train_cpu_seconds": round(time.process_time() - cpu, 2),
                             "final_loss": losses[-1] if losses else None}
    model.eval()
    if cache is not None:
        save_vqvae(model, Path(cache))
    return model


def _fit(model: VQVAE, images: np.ndarray, steps: int, batch_size: int, lr: float,
         rng: np.random.Generator, log_every: int) -> list[float]:
    k = model.config.codebook_size
    opt = torch.optim.Adam(list(model.encoder.parameters()) + list(model.decoder.parameters()),
                           lr=lr)
    warmup = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to 10%
        opt, lambda s: min((s + 1) / warmup,
                           0.55 + 0.45 * math.cos(math.pi * min(s / max(steps, 1), 1.0))))
    ema_count = torch.zeros(k)
    ema_sum = torch.zeros(k, model.config.code_dim)
    recent = torch.zeros(k)  # assignments since the last restart
    losses: list[float] = []
    model.train()
    for step in range(steps):
        x = _to_tensor(images[rng.integers(len(images), size=batch_size)])
        if step == 0:
            with torch.no_grad():  # codebook starts at encoder outputs of the first batch
                flat = _flat(model.encoder(x))
                model.codebook.copy_(flat[torch.randint(len(flat), (k,))])
                ema_sum.copy_(model.codebook)
                ema_count.fill_(1.0)
                # start the decoder at the mean colour: mostly-black images otherwise spend
                # the first steps of a short run learning the background
                model.decoder[-1].bias.copy_(x.mean((0, 2, 3)))
        recon, commitment, codes, z = model(x)
        loss = F.mse_loss(recon, x) + _COMMITMENT * commitment
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            z = _flat(z.detach())
            onehot = F.one_hot(codes.reshape(-1), k).float()
            counts = onehot.sum(0)
            recent += counts
            ema_count.mul_(_EMA_DECAY).add_(counts, alpha=1 - _EMA_DECAY)
            ema_sum.mul_(_EMA_DECAY).add_(onehot.T @ z, alpha=1 - _EMA_DECAY)
            n = ema_count.sum()
            smoothed = (ema_count + 1e-5) / (n + k * 1e-5) * n  # Laplace: no division by 0
            model.codebook.copy_(ema_sum / smoothed[:, None])
            if (step + 1) % _RESTART_EVERY == 0 and step + 1 < steps:
                _restart_dead(model, z, recent, ema_count, ema_sum)
                recent.zero_()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"vqvae step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    return losses


def _flat(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def _restart_dead(model: VQVAE, z: torch.Tensor, recent: torch.Tensor,
                  ema_count: torch.Tensor, ema_sum: torch.Tensor) -> None:
    dead = torch.nonzero(recent == 0).flatten()
    if len(dead) == 0:
        return
    pick = z[torch.randint(len(z), (len(dead),))]
    model.codebook[dead] = pick
    ema_sum[dead] = pick
    ema_count[dead] = 1.0


# ---- persistence --------------------------------------------------------------------------

def _config_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def _record(path: Path) -> dict[str, Any]:
    """The saved training record of a model file, or {} when there is none."""
    side = _config_path(path)
    if not (Path(path).is_file() and side.is_file()):
        return {}
    try:
        return json.loads(side.read_text()).get("training", {}) or {}
    except (json.JSONDecodeError, AttributeError):
        return {}


def save_vqvae(model: VQVAE, path: Path) -> None:
    """Weights to `path` (safetensors), config and training record to `path`'s .json."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    side = {"kind": "vqvae", "config": dataclasses.asdict(model.config),
            "training": model.training_record}
    _config_path(path).write_text(json.dumps(side, indent=1) + "\n")


def load_vqvae(path: Path) -> VQVAE:
    from safetensors.torch import load_file

    path, side = Path(path), _config_path(Path(path))
    for p in (path, side):
        if not p.is_file():
            raise FileNotFoundError(f"vqvae: {p} not found (a VQ-VAE is a .safetensors file "
                                    f"and its .json config beside it)")
    try:
        meta = json.loads(side.read_text())
        config = VQVAEConfig(**meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"vqvae: {side}: bad config ({type(e).__name__}: {e})") from e
    model = VQVAE(config)
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"vqvae: {path} does not match its config {side}: {first}") from e
    model.training_record = meta.get("training", {})
    return model.eval()


# ---- the image-tokenizer interface --------------------------------------------------------

class VQVAETokenizer(ImageTokenizer):
    def __init__(self, model: VQVAE) -> None:
        self.model = model.eval()

    @classmethod
    def load(cls, path: str | Path) -> VQVAETokenizer:
        return cls(load_vqvae(Path(path)))

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> np.ndarray:
        self._check_images(images)
        out = [self.model.encode(_to_tensor(images[s:s + _ENCODE_BATCH]))[1]
               for s in range(0, len(images), _ENCODE_BATCH)]
        g = self.grid_size
        return torch.cat(out).numpy().astype(np.int64) if out else np.zeros((0, g, g), np.int64)

    @torch.no_grad()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        g = self.grid_size
        if codes.ndim != 3 or codes.shape[1:] != (g, g):
            raise ValueError(f"vqvae: expected codes (N, {g}, {g}), got {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"vqvae: codes outside [0, {self.codebook_size})")
        out = []
        for s in range(0, len(codes), _ENCODE_BATCH):
            x = self.model.decode_codes(torch.from_numpy(codes[s:s + _ENCODE_BATCH]).long())
            out.append(x.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
                       .permute(0, 2, 3, 1).numpy())
        size = self.image_size
        return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8)

    @property
    def codebook_size(self) -> int:
        return self.model.config.codebook_size

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def grid_size(self) -> int:
        return self.model.config.grid_size

    def identity(self) -> str:
        h = hashlib.sha256(json.dumps(dataclasses.asdict(self.model.config),
                                      sort_keys=True).encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().contiguous().numpy().tobytes())
        return h.hexdigest()


# ---- quality -------------------------------------------------------------------------------

def reconstruction_mse(tokenizer: ImageTokenizer, images: np.ndarray) -> float:
    """Mean squared error of encode -> decode, pixels scaled to [0, 1]."""
    recon = tokenizer.decode(tokenizer.encode(images)).astype(np.float64) / 255
    return float(((recon - images.astype(np.float64) / 255) ** 2).mean())


def codebook_usage(tokenizer: ImageTokenizer, images: np.ndarray) -> dict[str, float | int]:
    """How the images use the codebook: perplexity of the code distribution (exp of its
    entropy; the codebook size when all codes are used equally), dead and used codes, and
    the share of all codes taken by the most frequent one (black background, for mosaics)."""
    codes = np.asarray(tokenizer.encode(images)).reshape(-1)
    counts = np.bincount(codes, minlength=tokenizer.codebook_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return {"perplexity": float(np.exp(-(p * np.log(p)).sum())),
            "dead_codes": int((counts == 0).sum()), "used": int((counts > 0).sum()),
            "top_share": float(counts.max() / counts.sum())}
