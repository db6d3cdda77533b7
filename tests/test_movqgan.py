"""MoVQGAN tokenizer on the CPU with random weights: the interface, persistence, and the
official checkpoint layout (key names and shapes) the released files must load into."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_t2i.tokenizers.movqgan import (
    PRESETS,
    TRAINING_ONLY_PREFIXES,
    MoVQ,
    MoVQConfig,
    MoVQGAN,
    _resolve_config,
    count_parameters,
)
from megatron_t2i.tokenizers.movqgan_keys import PUBLISHED_CONFIGS, published_layout

# The published image/code geometry (256 -> 32x32 of 16,384 codes) with thin channels, so a
# forward pass takes about a second on one core.
SMALL = MoVQConfig(ch=32, num_res_blocks=1)


@pytest.fixture(scope="module")
def tok() -> MoVQGAN:
    return MoVQGAN.from_config(SMALL, seed=0, device="cpu", batch_size=2)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def codes(tok, images) -> np.ndarray:
    return tok.encode(images)


@pytest.fixture(scope="module")
def decoded(tok, codes) -> np.ndarray:
    return tok.decode(codes[:1])


def test_encode_decode_shapes(tok, codes, decoded):
    assert (tok.image_size, tok.grid_size, tok.tokens_per_image) == (256, 32, 1024)
    assert codes.shape == (3, 32, 32) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 16384 == tok.codebook_size
    assert decoded.shape == (1, 256, 256, 3) and decoded.dtype == np.uint8


def test_deterministic_and_batched(tok, images, codes):
    """Same images and batch size -> the same codes. Another batching changes float rounding
    in the convolutions, which may flip a near tie between codebook rows, nothing more."""
    assert np.array_equal(tok.encode(images), codes)
    one_by_one = MoVQGAN(tok.model, device="cpu", batch_size=1).encode(images[1:])
    assert np.mean(one_by_one == codes[1:]) > 0.99


def test_bad_input_is_refused(tok):
    with pytest.raises(ValueError, match=r"uint8 images \(N, 256, 256, 3\)"):
        tok.encode(np.zeros((1, 128, 128, 3), np.uint8))
    with pytest.raises(ValueError, match=r"codes outside \[0, 16384\)"):
        tok.decode(np.full((1, 32, 32), 16384))
    with pytest.raises(ValueError, match=r"integer codes \(N, 32, 32\)"):
        tok.decode(np.zeros((1, 16, 16), np.int64))


def test_save_load_round_trip(tok, images, codes, decoded, tmp_path):
    """save() -> from_checkpoint(path): same weights, codes and decoded pixels."""
    tok.save(tmp_path / "movq.safetensors")
    again = MoVQGAN.from_checkpoint(tmp_path / "movq.safetensors", device="cpu")
    assert again.config == SMALL and again.identity() == tok.identity()
    assert np.array_equal(again.encode(images[:1]), codes[:1])
    assert np.array_equal(again.decode(codes[:1]), decoded)


def test_lightning_style_file_with_training_members_loads(tok, tmp_path):
    """A torch file nested under "state_dict" with the loss and EMA members of the training
    module loads; those members are dropped, the weights are the non-EMA ones."""
    state = dict(tok.model.state_dict())
    extras = {"loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4),
              "loss.perceptual_loss.lin0.model.1.weight": torch.zeros(1, 64, 1, 1),
              "ema_encoder.decay": torch.tensor(0.9999),
              "ema_decoder.conv_outweight": torch.zeros(3, 32, 3, 3)}
    assert all(k.startswith(TRAINING_ONLY_PREFIXES) for k in extras)
    torch.save({"state_dict": {**state, **extras}, "global_step": 5}, tmp_path / "m.ckpt")
    loaded = MoVQGAN.from_checkpoint(tmp_path / "m.ckpt", preset=SMALL, device="cpu")
    assert loaded.identity() == tok.identity()


class TrainingHparams:
    """Stands for the pickled objects a Lightning training checkpoint carries."""

    def __init__(self, lr: float) -> None:
        self.lr = lr


def test_unreadable_files_fail_clearly(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt not found"):
        MoVQGAN.from_checkpoint(tmp_path / "nope.ckpt")
    # A full training checkpoint pickles objects (here the trainer's own class); they are never
    # unpickled. (Not argparse.Namespace: megatron-core registers that as a safe global.)
    torch.save({"state_dict": tok.model.state_dict(), "hparams": TrainingHparams(lr=1)},
               tmp_path / "full.ckpt")
    with pytest.raises(ValueError, match="full.ckpt: not a weights-only torch file"):
        MoVQGAN.from_checkpoint(tmp_path / "full.ckpt", preset=SMALL)


@pytest.mark.parametrize("change, message", [
    ("drop", "missing keys (1): decoder.up.1.block.0.norm1.conv_y.weight"),
    ("add", "unexpected keys (1): decoder.up.1.block.0.norm1.conv.weight"),
    ("reshape", "shape mismatches (file vs model) (1): "
                "decoder.up.1.block.0.norm1.conv_y.weight (64, 8, 1, 1) vs (64, 4, 1, 1)"),
])
def test_mismatched_keys_fail_naming_them(tok, tmp_path, change, message):
    state = dict(tok.model.state_dict())
    key = "decoder.up.1.block.0.norm1.conv_y.weight"
    if change == "drop":
        del state[key]
    elif change == "add":
        state[key.replace("conv_y", "conv")] = torch.zeros(4, 4, 3, 3)  # add_conv=True's key
    else:
        state[key] = torch.zeros(64, 8, 1, 1)
    torch.save(state, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="does not match the given config") as err:
        MoVQGAN.from_checkpoint(tmp_path / "bad.ckpt", preset=SMALL)
    assert message in str(err.value) and "bad.ckpt" in str(err.value)


@pytest.mark.parametrize("name", ["67M", "102M", "270M"])
def test_presets_match_published_layout_key_by_key(name):
    """Every official key with its shape, and nothing else (model built on the meta device)."""
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in MoVQ(PRESETS[name]).state_dict().items()}
    published = published_layout(PUBLISHED_CONFIGS[name])
    assert sorted(set(published) - set(ours)) == [] and sorted(set(ours) - set(published)) == []
    assert {k: v for k, v in ours.items() if published[k] != v} == {}


@pytest.mark.parametrize("name, millions", [("67M", 67), ("102M", 102), ("270M", 270)])
def test_preset_parameter_counts(name, millions):
    assert count_parameters(PRESETS[name]) / 1e6 == pytest.approx(millions, rel=0.02)


@pytest.mark.parametrize("name", ["67M", "102M", "270M"])
def test_preset_inferred_from_keys(name):
    state = {k: torch.empty(v, device="meta")
             for k, v in published_layout(PUBLISHED_CONFIGS[name]).items()}
    assert _resolve_config(state, None)[0] == PRESETS[name]


def test_official_style_file_loads_strictly_without_preset(tmp_path):
    """A plain top-level state dict of the 67M layout (as the released .ckpt files are read by
    the official loader) loads with the preset inferred; bf16 tensors keep the file small."""
    layout = published_layout(PUBLISHED_CONFIGS["67M"])
    torch.save({k: torch.zeros(v, dtype=torch.bfloat16) for k, v in layout.items()},
               tmp_path / "movqgan_67M.ckpt")
    loaded = MoVQGAN.from_checkpoint(tmp_path / "movqgan_67M.ckpt", device="cpu")
    assert loaded.name == "67M" and loaded.config == PRESETS["67M"]
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())


@pytest.mark.gpu
def test_cuda_bf16_autocast_encode_decode(images):
    gpu = MoVQGAN.from_config(SMALL, seed=0, device="cuda", batch_size=2)
    codes = gpu.encode(images)
    assert codes.shape == (3, 32, 32) and np.array_equal(gpu.encode(images), codes)
    assert gpu.decode(codes).shape == (3, 256, 256, 3)
