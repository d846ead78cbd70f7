"""The ADM evaluation suite's metric math, without TensorFlow: FID/sFID, Inception Score, precision/recall.

Reference: openai/guided-diffusion `evaluations/evaluator.py` (the evaluator the DiT, SiT, REPA and
DDT papers report with). Each function follows its namesake there on precomputed activations:

- `frechet_distance`: `FIDStatistics.frechet_distance`, |μ1 − μ2|² + tr σ1 + tr σ2 − 2 tr (σ1σ2)^½, with
  the trace as the sum of the square roots of the eigenvalues of σ1^½ σ2 σ1^½ (ADM takes the trace of
  scipy's sqrtm of σ1σ2: the same number where sqrtm is exact; see `trace_sqrt_product`). It fails on a
  non-negligible imaginary part, as ADM. `frechet_distance_of` takes the samples' activations and, with
  fewer samples than dimensions, gets the same trace from a small matrix.
- `inception_score`: `Evaluator.compute_inception_score` (softmax of the unbiased logits, consecutive
  splits of 5,000 in sample order with the last partial split included, mean over the splits).
- `manifold_radii`, `precision_recall`: `ManifoldEstimator` with k = 3 and `DistanceBlock`
  (squared pairwise distances in float16, recomputed in float32 where float16 overflows).

Feature extraction and caching live in ddt.metrics.
"""
from __future__ import annotations

import numpy as np

SPLIT_SIZE = 5000        # compute_inception_score's split_size
NHOOD_SIZE = 3           # ManifoldEstimator's nhood_sizes=(3,)
ROW_BATCH = COL_BATCH = 10000  # ManifoldEstimator's row/col_batch_size


def statistics(activations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of activations (N, D) as Evaluator.compute_statistics: mean and np.cov (float64)."""
    return np.mean(activations, axis=0), np.cov(activations, rowvar=False)


def sum_sqrt_eigenvalues(inner: np.ndarray) -> float:
    """Σ √λ over the eigenvalues of a symmetric PSD matrix; fails on a negative one beyond rounding, as ADM
    fails on an imaginary part of sqrtm (a covariance that is not one, e.g. a corrupt reference sigma)."""
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    imaginary = np.sqrt(max(-eigenvalues.min(), 0.0))
    if imaginary > 1e-3:  # ADM's atol on the imaginary part of sqrtm's diagonal
        raise ValueError(f"FID: imaginary component {imaginary} in the square root of the covariances' product")
    return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr (σ1σ2)^½ of two covariances, from symmetric eigendecompositions (exact for singular ones).

    ADM's scipy sqrtm of σ1σ2 goes through a Schur form that a singular product makes inexact, and SciPy
    >= 1.16 warns then (LinAlgWarning) whatever `disp` says. A singular product is the rule, not an accident:
    the digits classifier's ReLU features have units that are 0 on every image (29 of 64 on 500 samples, a
    third of the sFID ones), so both covariances have zero rows. σ1σ2 is similar to the PSD σ1^½ σ2 σ1^½,
    so the eigenvalues are the same and the trace is the same number, without the warning or ADM's eps.
    """
    eigenvalues, vectors = np.linalg.eigh(np.asarray(sigma1, np.float64))
    root = (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T  # σ1 is PSD: negatives are rounding
    return sum_sqrt_eigenvalues(root @ np.asarray(sigma2, np.float64) @ root)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between two Gaussians, as FIDStatistics.frechet_distance."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def frechet_distance_of(activations: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of the statistics of activations (N, D) to (mu2, sigma2).

    With N > D this is frechet_distance on `statistics(activations)`, as ADM. With N <= D (curve points,
    toy runs) the same trace comes from a small matrix instead of D×D decompositions: σ1 = AᵀA with A the
    centred rows / √(N−1), so the eigenvalues of σ1σ2 are those of Aσ2Aᵀ.
    """
    n, d = activations.shape
    if n > d:
        return frechet_distance(*statistics(activations), mu2, sigma2)
    mu1 = np.mean(activations, axis=0)
    centred = (activations.astype(np.float64) - activations.astype(np.float64).mean(0)) / np.sqrt(n - 1)
    tr_covmean = sum_sqrt_eigenvalues(centred @ np.asarray(sigma2, np.float64) @ centred.T)
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.sum(centred ** 2) + np.trace(sigma2) - 2 * tr_covmean)


def split_scores(logits: np.ndarray, split_size: int = SPLIT_SIZE) -> np.ndarray:
    """exp(mean KL(p(y|x) || p(y))) of each consecutive split of `split_size` rows (the last may be shorter)."""
    logits = np.asarray(logits, dtype=np.float64)
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    scores = []
    for i in range(0, len(logits), split_size):
        part, log_part = np.exp(log_p[i:i + split_size]), log_p[i:i + split_size]
        log_marginal = np.log(part.mean(0, keepdims=True))
        # p·log p is 0 where p underflows to 0; ADM's p·(log p − log p̄) would make that nan.
        kl = np.where(part > 0, part * (log_part - log_marginal), 0.0)
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return np.asarray(scores)


def inception_score(logits: np.ndarray, split_size: int = SPLIT_SIZE) -> tuple[float, float]:
    """ADM's Inception Score of unbiased logits (N, classes): (mean, std) over consecutive splits."""
    scores = split_scores(logits, split_size)
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(u: np.ndarray, v: np.ndarray, dtype) -> np.ndarray:
    """max(|u|² − 2 u·v + |v|², 0) with every operation's result rounded to `dtype` (_batch_pairwise_distances)."""
    u, v = u.astype(dtype), v.astype(dtype)
    # Products of float16 numbers are exact in float32, so float32 arithmetic rounded to float16 after
    # each operation is float16 math with float32 accumulation (what a GPU's float16 matmul does).
    wide = np.float32 if dtype == np.float16 else dtype
    norm_u = np.sum(np.square(u, dtype=wide), 1, dtype=wide).astype(dtype)[:, None]
    norm_v = np.sum(np.square(v, dtype=wide), 1, dtype=wide).astype(dtype)[None, :]
    dot2 = (2 * np.matmul(u.astype(wide), v.astype(wide).T).astype(dtype)).astype(dtype)
    return np.maximum((norm_u - dot2).astype(dtype) + norm_v, 0).astype(dtype)


def pairwise_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """DistanceBlock: squared distances (len(u), len(v)) in float16, in float32 where any is not finite."""
    with np.errstate(over="ignore", invalid="ignore"):
        d16 = _squared_distances(u, v, np.float16)
    if np.isfinite(d16).all():
        return d16.astype(np.float32)
    return _squared_distances(u, v, np.float32)


def manifold_radii(features: np.ndarray, k: int = NHOOD_SIZE, row_batch: int = ROW_BATCH,
                   col_batch: int = COL_BATCH) -> np.ndarray:
    """Squared distance of each row to its k-th nearest neighbour (itself at 0 counts as the 0th)."""
    n = len(features)
    radii = np.zeros(n, dtype=np.float32)
    for begin1 in range(0, n, row_batch):
        rows = features[begin1:begin1 + row_batch]
        distances = np.concatenate([pairwise_distances(rows, features[begin2:begin2 + col_batch])
                                    for begin2 in range(0, n, col_batch)], axis=1)
        radii[begin1:begin1 + len(rows)] = np.partition(distances, k, axis=1)[:, k]
    return radii


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = NHOOD_SIZE,
                     row_batch: int = ROW_BATCH, col_batch: int = COL_BATCH) -> tuple[float, float]:
    """Evaluator.compute_prec_recall(reference, samples): precision = share of samples inside some
    reference ball, recall = share of reference points inside some sample ball (distance <= radius)."""
    radii_ref = manifold_radii(reference, k, row_batch, col_batch)
    radii_samples = manifold_radii(samples, k, row_batch, col_batch)
    ref_in = np.zeros(len(reference), dtype=bool)
    samples_in = np.zeros(len(samples), dtype=bool)
    for begin1 in range(0, len(reference), row_batch):
        end1 = begin1 + row_batch
        for begin2 in range(0, len(samples), col_batch):
            end2 = begin2 + col_batch
            distances = pairwise_distances(reference[begin1:end1], samples[begin2:end2])
            ref_in[begin1:end1] |= (distances <= radii_samples[None, begin2:end2]).any(1)
            samples_in[begin2:end2] |= (distances <= radii_ref[begin1:end1, None]).any(0)
    return float(samples_in.mean()), float(ref_in.mean())
