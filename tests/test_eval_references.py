"""FID Inception and CLIP score held against maintained implementations, on random weights.

FID: torch-fidelity's `FeatureExtractorInceptionV3` (the network torchmetrics'
FrechetInceptionDistance runs) reads the same weights file as ours. torch-fidelity's package
`__init__` imports torchvision for unrelated extractors, and PyPI's torchvision does not import
beside this torch build, so the test loads its Inception module without that `__init__`
(docs/evaluation.md). CI installs torch-fidelity without dependencies into
.cache/test-packages, outside the venv (tools/setup_env.sh).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import string
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_t2i.eval.clip_score import clip_score, clip_scores, load_clip
from megatron_t2i.eval.fid import fid_from_features
from megatron_t2i.eval.inception import FIDInceptionV3, load_fid_inception

REPO = Path(__file__).resolve().parents[1]
FIDELITY_TARGET = REPO / ".cache" / "test-packages"


def _torch_fidelity_folder() -> Path | None:
    """Where torch-fidelity's package lies: tools/setup_env.sh test puts it in
    .cache/test-packages (outside the venv); an installed copy also does."""
    if (FIDELITY_TARGET / "torch_fidelity" / "__init__.py").is_file():
        return FIDELITY_TARGET / "torch_fidelity"
    spec = importlib.util.find_spec("torch_fidelity")
    return Path(spec.submodule_search_locations[0]) if spec else None


def _torch_fidelity_inception() -> type:
    """torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3, imported
    under a bare package object instead of the package's `__init__` (which needs torchvision);
    sys.modules is left as it was."""
    folder = _torch_fidelity_folder()
    if folder is None:
        pytest.skip("torch-fidelity not found (tools/setup_env.sh test puts it in "
                    ".cache/test-packages)")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "torch_fidelity"}
    package = types.ModuleType("torch_fidelity")
    package.__path__ = [str(folder)]
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


# ---- CLIP score ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random two-layer CLIPModel with a character-level tokenizer and a 32-pixel image
    processor, saved as a local checkpoint folder (what a user's saved ViT-L/14 looks like)."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    folder = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + ".,'-":
        vocab[ch], vocab[ch + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")  # no merges: characters are tokens
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1, **layers),
        vision_config=dict(image_size=32, patch_size=8, **layers), projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config)
    with torch.no_grad():  # the random towers disagree on every pair (cos ~ -0.3); flipped,
        model.text_projection.weight.neg_()  # they agree a little, as a trained CLIP does
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


CAPTIONS = ["a red circle at the top left", "two blue squares", "a green triangle", "nothing"]


def _direct_clip_scores(folder: Path, images: np.ndarray, captions: list[str]) -> np.ndarray:
    """The definition step by step through the model's parts: vision and text towers, their
    projections, L2 normalisation, 100 * max(cos, 0)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    inputs = CLIPProcessor.from_pretrained(folder, local_files_only=True)(
        text=captions, images=list(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(inputs["pixel_values"]).pooler_output)
        text = model.text_projection(model.text_model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output)
    image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
    return (100 * (image * text).sum(-1).clamp(min=0)).numpy()


def test_clip_score_equals_direct_computation(tiny_clip):
    images = np.random.default_rng(0).integers(0, 256, (4, 40, 48, 3), dtype=np.uint8)
    expected = _direct_clip_scores(tiny_clip, images, CAPTIONS)
    model, processor = load_clip(tiny_clip)
    got = clip_scores(images, CAPTIONS, model, processor, batch_size=3)  # batches of 3 and 1
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    assert len(set(np.round(expected, 3))) == 4 and (expected > 0).all()
    assert clip_score(images, CAPTIONS, model, processor) == pytest.approx(expected.mean(),
                                                                            rel=1e-5)
    with torch.no_grad():
        model.text_projection.weight.neg_()  # every cosine changes sign: a score is never < 0
    assert (clip_scores(images, CAPTIONS, model, processor) == 0).all()


def test_fid_tool_reports_clip_score_from_the_samples_captions(tiny_clip, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("fid_tool", REPO / "tools" / "fid.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    fid_main = tool.main
    _random_inception_file(tmp_path / "inception.pth")
    images = np.random.default_rng(1).integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", images=images, captions=np.array(CAPTIONS))
    np.savez(tmp_path / "ref.npz", images=images[::-1].copy())
    args = ["--generated", str(tmp_path / "samples.npz"), "--reference", str(tmp_path / "ref.npz"),
            "--inception-weights", str(tmp_path / "inception.pth"), "--clip-model", str(tiny_clip)]
    assert fid_main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["clip_score"] == pytest.approx(
        _direct_clip_scores(tiny_clip, images, CAPTIONS).mean(), rel=1e-5)
    assert report["fid"] == pytest.approx(0.0, abs=1e-3)  # the same images in another order
    (tmp_path / "three.txt").write_text("\n".join(CAPTIONS[:3]) + "\n")
    assert fid_main(args + ["--captions-file", str(tmp_path / "three.txt")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: CLIP score: 4 generated images but 3 captions in {tmp_path / 'three.txt'}")
