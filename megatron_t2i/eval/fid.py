"""Fréchet Inception Distance between generated and reference images.

FID = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) over Inception pool3 features
(inception.py, weights from a local file). The trace of the matrix square root comes from
symmetric eigendecompositions (trace_sqrt_product), equal to the reference implementations'
`scipy.linalg.sqrtm` but much faster at 2048 dimensions and exact for singular covariances;
with fewer images than dimensions the whole distance is computed in sample space
(fid_from_features).

Images come from a folder of PNG/JPEG files or an .npz with an `images` array (uint8
[n, h, w, 3]), e.g. the one tools/generate_images.py writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megatron_t2i.eval.inception import FIDInceptionV3, load_fid_inception

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """The Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"frechet_distance: shapes differ: means {mu1.shape} vs {mu2.shape}, "
                         f"covariances {sigma1.shape} vs {sigma2.shape}")
    for name, x in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(x).all():
            raise ValueError(f"frechet_distance: {name} has non-finite values")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * trace_sqrt_product(sigma1, sigma2))


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) for covariances S1, S2.

    S1 S2 is similar to S1^(1/2) S2 S1^(1/2), which is symmetric and positive semi-definite,
    so the trace is the sum of the square roots of that matrix's eigenvalues: two symmetric
    eigendecompositions. The result equals `np.trace(scipy.linalg.sqrtm(S1 @ S2))` (the
    reference implementations' formula; tested against it) without its general Schur
    decomposition, which took some 40x longer for 2048 dimensions here, and without the
    complex round-off and singular-matrix retries: eigenvalues that round-off pushes below
    zero (singular covariances, fewer samples than dimensions) are clipped to zero.
    """
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples)."""
    if len(features) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(features)}")
    features = features.astype(np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def inception_features(model: FIDInceptionV3, images: np.ndarray, batch_size: int = 32,
                       device: str | torch.device = "cpu") -> np.ndarray:
    """uint8 images [n, h, w, 3] -> pool3 features [n, 2048]."""
    model = model.to(device)
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
            batch = batch.to(device).permute(0, 3, 1, 2).float() / 255.0
            out.append(model(batch).cpu().numpy())
    return np.concatenate(out)


def load_images(source: str | Path) -> np.ndarray:
    """uint8 [n, h, w, 3] from an .npz (`images`) or a folder of image files (sorted)."""
    from PIL import Image

    source = Path(source)
    if source.suffix == ".npz":
        with np.load(source, allow_pickle=False) as f:
            if "images" not in f:
                raise KeyError(f"{source}: no 'images' array (has {list(f.keys())})")
            images = f["images"]
    elif source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{source}: no {'/'.join(IMAGE_SUFFIXES)} files")
        images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    else:
        raise FileNotFoundError(f"{source}: neither an .npz file nor a folder of images")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{source}: expected uint8 images [n, h, w, 3], got {images.dtype} "
                         f"{images.shape}")
    return images


def fid(generated: np.ndarray, reference: np.ndarray, model: FIDInceptionV3,
        batch_size: int = 32, device: str | torch.device = "cpu") -> float:
    """FID between two sets of uint8 images (any size: Inception resizes them)."""
    return fid_from_features(inception_features(model, generated, batch_size, device),
                             inception_features(model, reference, batch_size, device))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets (rows are samples).

    With no more samples than dimensions the covariances have low rank, and the distance is
    computed in sample space: with centred features X_i and c = (n_1 - 1)(n_2 - 1), the
    non-zero eigenvalues of S_1 S_2 are those of (X_1 X_2^T)(X_1 X_2^T)^T / c, so
    Tr((S_1 S_2)^(1/2)) is the sum of the singular values of X_1 X_2^T over sqrt(c): an
    n_1 x n_2 problem instead of a 2048 x 2048 one. Otherwise, from the statistics.
    """
    if features1.shape[1:] != features2.shape[1:]:
        raise ValueError(f"FID: feature sizes differ: {features1.shape} vs {features2.shape}")
    if max(len(features1), len(features2)) > features1.shape[1]:
        return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
    feature_statistics(features1), feature_statistics(features2)  # the sample-count checks
    x1 = features1.astype(np.float64) - features1.mean(0)
    x2 = features2.astype(np.float64) - features2.mean(0)
    c1, c2 = len(x1) - 1, len(x2) - 1
    diff = features1.mean(0) - features2.mean(0)
    cross = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / np.sqrt(c1 * c2)
    return float(diff @ diff + (x1**2).sum() / c1 + (x2**2).sum() / c2 - 2 * cross)


def fid_report(generated: str | Path, reference: str | Path, weights: str | Path,
               batch_size: int = 32, device: str = "cpu", clip_model: str | Path | None = None,
               captions_file: str | Path | None = None) -> dict[str, float | int | str]:
    """What tools/fid.py prints: FID and the sets it compared, and the CLIP score of the
    generated images against their captions when a local CLIP folder is given."""
    gen, ref = load_images(generated), load_images(reference)
    captions = None
    if clip_model is not None:  # read the captions first: a mismatch fails before any model
        from megatron_t2i.eval.clip_score import read_captions

        captions = read_captions(generated, captions_file, len(gen))
    value = fid(gen, ref, load_fid_inception(weights), batch_size, device)
    report = {"fid": value, "generated": str(generated), "reference": str(reference),
              "num_generated": len(gen), "num_reference": len(ref), "weights": str(weights)}
    if captions is not None:
        from megatron_t2i.eval.clip_score import clip_score, load_clip

        report["clip_score"] = clip_score(gen, captions, *load_clip(clip_model), batch_size,
                                          device)
        report["clip_model"] = str(clip_model)
    return report
