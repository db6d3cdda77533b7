"""MoVQGAN tokenizer on the CPU with random weights: the interface, persistence, and the
official checkpoint layout (key names and shapes) the released files must load into."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from megatron_t2i.tokenizers.movqgan import (
    PRESETS,
    TRAINING_ONLY_PREFIXES,
    MoVQConfig,
    MoVQGAN,
    _resolve_config,
    build_vqmodel,
    count_parameters,
    decode_codes,
    encode_codes,
)
from megatron_t2i.tokenizers.movqgan_keys import (
    PUBLISHED_CONFIGS,
    diffusers_key,
    published_layout,
    to_diffusers,
)

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
    one_by_one = MoVQGAN(tok.model, tok.config, device="cpu", batch_size=1).encode(images[1:])
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
    state = tok.official_state_dict()
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
    torch.save({"state_dict": tok.official_state_dict(), "hparams": TrainingHparams(lr=1)},
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
    state = tok.official_state_dict()
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
def test_key_map_covers_diffusers_model_exactly(name):
    """Every official key maps onto one diffusers VQModel key with the same number of values
    and every VQModel key is reached (model built on the meta device)."""
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in build_vqmodel(PRESETS[name]).state_dict().items()}
    published = published_layout(PUBLISHED_CONFIGS[name])
    mapped = {diffusers_key(k, 4): k for k in published}
    assert len(mapped) == len(published)  # one-to-one
    assert sorted(set(mapped) - set(theirs)) == [] and sorted(set(theirs) - set(mapped)) == []
    assert [k for k, o in mapped.items()
            if math.prod(theirs[k]) != math.prod(published[o])] == []


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


# ---- agreement with the official network (tests/movqgan_reference.py) ---------------------

def _random_official_state(cfg: MoVQConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors for every official key: weights of a usual scale, norms near one, and
    nothing zero, so every path (biases, SpatialNorm shifts, attention) carries signal."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in published_layout(dataclasses.asdict(cfg)).items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        value = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        if "norm" in key and key.endswith(".weight") and len(shape) == 1:
            value = 1 + 0.1 * value
        state[key] = value
    return state


# The three published configurations at 32 x 32 pixels (4 x 4 codes): the topology and the
# weights are the official ones (attention wherever the 32 x 32-code level attends at 256 px,
# since `resolution` only decides which level attends), the convolutions run on fewer
# pixels (1/64 of the work). 270M: ~1.1 GB per copy of the weights. The published geometry
# (256 x 256 pixels, 32 x 32 codes) runs under the slow marker.
@pytest.mark.parametrize("name, pixels", [
    ("67M", 32), ("102M", 32), ("270M", 32),
    pytest.param("67M", 256, marks=pytest.mark.slow),
    pytest.param("270M", 256, marks=pytest.mark.slow),
])
def test_diffusers_network_matches_official_modules(name, pixels):
    """One random state dict in the official layout, loaded strictly into the reference
    written from the official modules and, through the key map, into diffusers' VQModel:
    the same codes and the same decoded pixels."""
    from movqgan_reference import MoVQ as OfficialMoVQ

    cfg = PRESETS[name]
    state = _random_official_state(cfg, seed=0)
    with torch.device("meta"):
        reference, vqmodel = OfficialMoVQ(cfg), build_vqmodel(cfg)
    reference.load_state_dict(state, strict=True, assign=True)
    x = torch.rand(2, 3, pixels, pixels, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        # Random deep residual stacks scale the latents far from a N(0, 1) codebook (every
        # latent then picks one of a few extreme rows): draw the codebook at their scale.
        z = reference.quant_conv(reference.encoder(x)).transpose(0, 1).flatten(1)
        table = state["quantize.embedding.weight"]
        table.copy_(table * z.std(1) + z.mean(1))
    vqmodel.load_state_dict(to_diffusers(state, len(cfg.ch_mult)), strict=True, assign=True)
    with torch.inference_mode():
        codes = reference.encode_codes(x)
        assert len(codes.unique()) > 8  # a real test of the lookup, not one code everywhere
        _, _, (_, _, theirs) = vqmodel.quantize(vqmodel.encode(x).latents)  # diffusers' argmin
        _assert_same_or_tied(z, table, codes, theirs.reshape(codes.shape))
        _assert_same_or_tied(z, table, codes, encode_codes(vqmodel, x))  # the tokenizer's path
        torch.testing.assert_close(decode_codes(vqmodel, codes), reference.decode_codes(codes),
                                   rtol=1e-4, atol=1e-4)


def _assert_same_or_tied(z: torch.Tensor, table: torch.Tensor, codes: torch.Tensor,
                         other: torch.Tensor) -> None:
    """Equal codes, except (under 1%) where the two rows are equally near the latent: the
    latents agree to ~1e-6 and the distance formulas round differently (diffusers' cdist vs
    |z|^2 + |e|^2 - 2 z.e), which may flip a near tie among 16,384 rows, nothing more."""
    differ = (codes != other).flatten()
    assert differ.float().mean() < 0.01
    latents = z.T[differ]  # z: (embed_dim, positions) in the codes' (batch, row, col) order
    near = ((latents - table[codes.flatten()[differ]]) ** 2).sum(1)
    far = ((latents - table[other.flatten()[differ]]) ** 2).sum(1)
    torch.testing.assert_close(far, near, rtol=1e-4, atol=1e-5)
