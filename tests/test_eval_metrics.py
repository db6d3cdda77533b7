"""Evaluation pieces that need no trained model: the Fréchet distance, the FID Inception
network and its weights file, sampling filters, caption parsing and caption fidelity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from megatron_t2i.data import synthetic
from megatron_t2i.eval.fid import (
    feature_statistics,
    fid_from_features,
    fid_report,
    frechet_distance,
    trace_sqrt_product,
)
from megatron_t2i.eval.fidelity import caption_fidelity
from megatron_t2i.eval.generate import SamplingParams, filter_logits, sample_next
from megatron_t2i.eval.inception import FIDInceptionV3, load_fid_inception

# ---- Fréchet distance -----------------------------------------------------------------------


def test_frechet_distance_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    d1, d2 = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected)


def test_frechet_distance_of_equal_distributions_is_zero_even_when_singular():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 8))  # 3 samples in 8 dimensions: a singular covariance
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-4)
    a = rng.normal(size=(4, 4))
    full = a @ a.T + np.eye(4)
    assert frechet_distance(np.zeros(4), full, np.zeros(4), full) == pytest.approx(0, abs=1e-8)


def test_trace_sqrt_product_equals_scipy_sqrtm():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 3))
    s1, s2 = a @ a.T, b @ b.T  # s2 singular
    reference = np.trace(linalg.sqrtm(s1 @ s2)).real
    assert trace_sqrt_product(s1, s2) == pytest.approx(reference, rel=1e-6)


def test_fid_in_sample_space_equals_fid_from_statistics():
    rng = np.random.default_rng(3)
    f1, f2 = rng.normal(size=(3, 8)), rng.normal(1.0, 2.0, size=(5, 8))  # fewer than 8 dims
    expected = frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
    assert fid_from_features(f1, f2) == pytest.approx(expected, rel=1e-6)
    assert fid_from_features(f1, f1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="sigma2 has non-finite"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.full((2, 2), np.nan))


# ---- Inception ------------------------------------------------------------------------------


def test_inception_has_the_published_size_and_key_layout():
    state = FIDInceptionV3().state_dict()
    # torchvision's inception_v3 has 27,161,264 parameters; without its auxiliary head
    # (3,326,696) and 1000-way classifier (2,049,000) that leaves 21,785,568
    assert sum(p.numel() for p in FIDInceptionV3().parameters()) == 21_785_568
    assert sum(k.endswith("conv.weight") for k in state) == 94
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert state["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert state["Mixed_7c.branch_pool.bn.running_var"].shape == (192,)


def _weights_file(path, model: FIDInceptionV3) -> None:
    """A file laid out like pytorch-fid's: the network plus a 1008-way fc, no BN counters."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    torch.save(state, path)


def test_fid_tool_path_on_random_weights(tmp_path):
    torch.manual_seed(0)
    model = FIDInceptionV3()
    for m in model.modules():  # non-trivial statistics, so a wrong load would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    _weights_file(tmp_path / "inception.pth", model)
    loaded = load_fid_inception(tmp_path / "inception.pth").state_dict()
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded[key], value), key
    images = synthetic.generate(2, image_size=16, seed=0).images
    np.savez(tmp_path / "gen.npz", images=images)
    (tmp_path / "ref").mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / "ref" / f"{i}.png")
    report = fid_report(tmp_path / "gen.npz", tmp_path / "ref", tmp_path / "inception.pth")
    assert report["num_generated"] == report["num_reference"] == 2
    assert report["fid"] == pytest.approx(0.0, abs=1e-3)  # the same images, read two ways


def test_inception_weights_with_a_wrong_layout_are_refused(tmp_path):
    state = FIDInceptionV3().state_dict()
    state.pop("Mixed_5b.branch1x1.conv.weight")
    state["Mixed_5c.branch_pool.conv.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad.pth.*missing.*Mixed_5b.*shapes differ"):
        load_fid_inception(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_fid_inception(tmp_path / "nothing.pth")


# ---- sampling -------------------------------------------------------------------------------


def test_top_k_and_top_p_keep_the_right_ids():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    # the nucleus: the fewest most likely ids whose mass reaches top_p
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False,
                                                                           False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True,
                                                                            False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).tolist() == [[True, False, False,
                                                                           False]]


def test_sampling_is_seeded_and_greedy_is_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    greedy = sample_next(logits, SamplingParams(temperature=0), torch.Generator())
    assert torch.equal(greedy, logits.argmax(-1))
    params = SamplingParams(temperature=1.0, top_k=10, top_p=0.9)
    draws = [sample_next(logits, params, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    top10 = logits.topk(10, dim=-1).indices
    assert all(int(d) in top10[i].tolist() for i, d in enumerate(draws[0]))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


# ---- caption fidelity -----------------------------------------------------------------------


def test_parse_caption_inverts_caption_and_refuses_others():
    corpus = synthetic.generate(30, seed=3)
    assert [synthetic.parse_caption(c) for c in corpus.captions] == corpus.objects
    with pytest.raises(ValueError, match="not a synthetic-corpus caption"):
        synthetic.parse_caption("a cat on a mat")


def test_caption_fidelity_scores_renders_and_mismatches():
    corpus = synthetic.generate(20, seed=4)
    perfect = caption_fidelity(corpus.images, corpus.captions)
    assert {k: perfect[k] for k in ("exact", "count", "position", "shape", "colour")} == \
        dict.fromkeys(("exact", "count", "position", "shape", "colour"), 1.0)
    # right places, wrong colour: positions and shapes still score, colours do not
    objects = (synthetic.SceneObject("circle", "red", "top left"),)
    recoloured = synthetic.render((synthetic.SceneObject("circle", "blue", "top left"),))
    score = caption_fidelity(recoloured[None], [synthetic.caption(objects)])
    assert (score["exact"], score["position"], score["shape"], score["colour"]) == (0, 1, 1, 0)
    blank = np.zeros((1, 32, 32, 3), np.uint8)
    assert caption_fidelity(blank, [synthetic.caption(objects)])["position"] == 0
