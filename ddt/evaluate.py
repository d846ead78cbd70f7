"""The ADM scorer's command line: check an ADM-layout sample batch (arr_0 uint8 NHWC, e.g. from DiT's
sample_ddp.py) and a reference batch, then print and write the five metrics of openai/guided-diffusion's
`evaluations/evaluator.py` (Inception Score, FID, sFID, precision, recall; computed by ddt.metrics)
the way that evaluator's command line does:

    python -m ddt.evaluate SAMPLES.npz VIRTUAL_imagenet256_labeled.npz [--inception-weights FILE]
        [--cache-dir DIR] [--out metrics.json]
"""
from __future__ import annotations

import json
import logging
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from ddt.batches import STAT_PAIRS, count_images, npz_header
from ddt.checkpoint import atomic_write_bytes
from ddt.extractors import INCEPTION_EXTRACTOR, INCEPTION_URL, inception_weights_path
from ddt.metrics import SPATIAL_CHANNELS, calculate_metrics
from ddt.models.digits_classifier import file_sha256

# What Inception gives each metric: the pool (FID) and mixed_6/conv's first channels on its 17×17 grid (sFID).
INCEPTION_DIMS = {"fid": 2048, "sfid": 17 * 17 * SPATIAL_CHANNELS}
SAVE_ADVICE = "save it with np.savez(path, arr_0=images)"


def batch_problems(path: str | Path, role: str) -> list[str]:
    """One line per problem that stops `path` from serving as an ADM `role` batch ("sample" or "reference")."""
    path = Path(path)
    if not path.is_file():
        return [f"{role} batch {path} does not exist"]
    if not zipfile.is_zipfile(path):  # else np.load tries it as a pickle and advises allow_pickle
        return [f"{role} batch {path} is not an npz (zip) file; {SAVE_ADVICE}"]
    try:
        with np.load(path) as npz:
            files = set(npz.files)
        header = npz_header(path)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        return [f"{role} batch {path} is not a readable npz file ({' '.join(str(err).split()) or type(err).__name__}); "
                f"{SAVE_ADVICE}"]
    problems = []
    if header is None:
        stats = "" if role == "sample" else (" (precision and recall need the reference images"
                                              + ("" if {"mu_s", "sigma_s"} <= files else ", and it has no "
                                                 "mu_s/sigma_s to give sFID without them") + ")")
        problems.append(f"{role} batch {path} has no arr_0 (arrays: {sorted(files)}){stats}; it must hold "
                        f"uint8 images N×H×W×3 in arr_0")
    else:
        shape, dtype = header
        if len(shape) == 4 and shape[0] == 0:
            problems.append(f"{role} batch {path} holds no images (arr_0 has shape {shape}); {SAVE_ADVICE}")
        elif dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            problems.append(f"{role} batch {path}: arr_0 is {dtype} of shape {shape}; it must be uint8 N×H×W×3 "
                            f"(NHWC, 0-255), as np.savez(path, arr_0=images) of the ADM suite")
    for metric, pair in STAT_PAIRS.items():
        if len(set(pair) & files) == 1:
            problems.append(f"{role} batch {path} has {sorted(set(pair) & files)[0]} without "
                            f"{sorted(set(pair) - files)[0]}; {metric} needs both (or neither, to compute them)")
    return problems


def pair_problems(samples: Path, reference: Path) -> list[str]:
    """One line per size that does not fit between two well-formed batches and Inception's features."""
    problems = []
    sample_shape, reference_header = npz_header(samples)[0], npz_header(reference)
    if reference_header is not None and reference_header[0][1:3] != sample_shape[1:3]:
        size = "×".join(map(str, reference_header[0][1:3]))
        problems.append(f"sample batch {samples} holds {'×'.join(map(str, sample_shape[1:3]))} images but reference "
                        f"batch {reference} holds {size} ones; score samples against the reference batch of their "
                        f"resolution, or sample at {size}")
    for metric, (mu, sigma) in STAT_PAIRS.items():
        dims, headers = INCEPTION_DIMS[metric], (npz_header(reference, mu), npz_header(reference, sigma))
        shapes = [header[0] for header in headers if header is not None]
        if shapes and shapes != [(dims,), (dims, dims)]:  # batch_problems saw both or neither
            problems.append(f"reference batch {reference}: {mu}/{sigma} have shapes {shapes[0]}/{shapes[1]} where "
                            f"Inception's {metric} features are {dims}-d; they were made with another network, use "
                            f"the ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz)")
    return problems


def score_batches(samples: Path, reference: Path, weights: Path, cache_dir: Path, batch_size: int) -> dict:
    """The five ADM metrics of a sample batch against a reference batch, with what made them."""
    metrics = calculate_metrics(samples, reference, feature_extractor=INCEPTION_EXTRACTOR, weights_path=weights,
                                cache_dir=cache_dir, reference_name=reference.stem, prc=True, kid=False,
                                isc_protocol="adm", batch_size=batch_size)
    return {**metrics, "isc_protocol": "adm", "num_samples": count_images(samples), "samples": str(samples),
            "reference": str(reference), "reference_sha256": file_sha256(reference),
            "feature_extractor": {"name": INCEPTION_EXTRACTOR, "weights": str(weights),
                                  "sha256": file_sha256(weights)}}


ADM_LINES = (("Inception Score", "isc_mean"), ("FID", "fid"), ("sFID", "sfid"), ("Precision", "precision"),
             ("Recall", "recall"))


def main(argv: list[str] | None = None) -> int:
    """`python -m ddt.evaluate SAMPLES.npz REFERENCE.npz`: print and write the ADM evaluator's five metrics."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ddt.evaluate", description=main.__doc__)
    parser.add_argument("samples", type=Path, help="sample batch npz: arr_0 uint8 N×H×W×3")
    parser.add_argument("reference", type=Path, help="reference batch npz, e.g. VIRTUAL_imagenet256_labeled.npz")
    parser.add_argument("--inception-weights", default=None,
                        help=f"torch-fidelity Inception-v3 weights (default: CACHE_DIR/{Path(INCEPTION_URL).name})")
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("DDT_CACHE_DIR", ".cache/ddt")),
                        help="weights and cached reference activations (default: $DDT_CACHE_DIR or .cache/ddt)")
    parser.add_argument("--out", type=Path, default=None, help="metrics JSON (default: SAMPLES with .metrics.json)")
    parser.add_argument("--batch-size", type=int, default=200)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Every check of the batches comes before the weights, which may need a download.
    problems = batch_problems(args.samples, "sample") + batch_problems(args.reference, "reference")
    problems = problems or pair_problems(args.samples, args.reference)
    try:
        weights = (inception_weights_path(args.inception_weights, args.cache_dir, key="--inception-weights")
                   if not problems else None)
    except (OSError, RuntimeError) as err:
        problems.append(" ".join(str(err).split()))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 2
    result = score_batches(args.samples, args.reference, weights, args.cache_dir, args.batch_size)
    for label, key in ADM_LINES:
        print(f"{label}: {result[key]}")
    out = args.out or args.samples.with_suffix(".metrics.json")
    atomic_write_bytes(out, lambda f: f.write(json.dumps(result, indent=2).encode()))
    print(f"metrics written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
