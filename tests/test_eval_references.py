"""FID Inception and CLIP score held against maintained implementations, on random weights.

FID: torch-fidelity's `FeatureExtractorInceptionV3` (the network torchmetrics'
FrechetInceptionDistance runs) reads the same weights file as ours. torch-fidelity's package
`__init__` imports torchvision for unrelated extractors, and PyPI's torchvision does not import
beside this torch build, so the test loads its Inception module without that `__init__`
(docs/evaluation.md). CI installs torch-fidelity without dependencies (tools/setup_env.sh).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from megatron_t2i.eval.fid import fid_from_features
from megatron_t2i.eval.inception import FIDInceptionV3, load_fid_inception


def _torch_fidelity_inception() -> type:
    """torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3, imported
    under a bare package object instead of the package's `__init__` (which needs torchvision);
    sys.modules is left as it was."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        pytest.skip("torch-fidelity is not installed (tools/setup_env.sh test installs it)")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "torch_fidelity"}
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
    try:
        module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
        return module.FeatureExtractorInceptionV3
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] == "torch_fidelity"]:
            del sys.modules[k]
        sys.modules.update(saved)


def _random_inception_file(path) -> FIDInceptionV3:
    """A weights file in pytorch-fid / torch-fidelity layout with random weights and batch-norm
    statistics (so a mis-wired branch or a wrong eps would show)."""
    torch.manual_seed(0)
    model = FIDInceptionV3()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.8, 1.2)
            m.bias.data.uniform_(-0.1, 0.1)
    state = dict(model.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.randn(1008, 2048) * 0.01, torch.zeros(1008)
    torch.save(state, path)
    return model


def test_fid_inception_matches_torch_fidelity(tmp_path):
    """One random weights file read by both networks: the same 2048-d features and FID.

    At 299 x 299 neither side resizes; the inputs differ only in the [-1, 1] scaling, which
    ours takes as 2 * x - 1 from x = u / 255 (pytorch-fid's convention) and torch-fidelity as
    (u - 128) / 128 (the TensorFlow graph's): feeding ours u / 256 gives its exact input."""
    _random_inception_file(tmp_path / "inception.pth")
    ours = load_fid_inception(tmp_path / "inception.pth")
    weights = str(tmp_path / "inception.pth")
    theirs = _torch_fidelity_inception()("inception-v3-compat", ["2048"],
                                         feature_extractor_weights_path=weights)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 299, 299, 3), dtype=np.uint8)
    images[3:] //= 2  # a second, darker set, so the FID is not about noise alone
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        expected = theirs(batch)[0].numpy()
        got = ours(batch.float() / 256).numpy()
    assert expected.shape == got.shape == (6, 2048)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    # The formula is held against scipy.linalg.sqrtm (pytorch-fid's and torch-fidelity's) in
    # tests/test_eval_metrics.py; here: the same FID from either network's features.
    fid = fid_from_features(got[:3], got[3:])
    assert fid > 0 and fid == pytest.approx(fid_from_features(expected[:3], expected[3:]),
                                            rel=1e-4)
