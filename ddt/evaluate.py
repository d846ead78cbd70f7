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
from ddt.metrics import calculate_metrics
from ddt.models.digits_classifier import file_sha256


def batch_problems(path: str | Path, role: str) -> list[str]:
    """One line per problem that stops `path` from serving as an ADM `role` batch ("sample" or "reference")."""
    path = Path(path)
    if not path.is_file():
        return [f"{role} batch {path} does not exist"]
    try:
        with np.load(path) as npz:
            files = set(npz.files)
        header = npz_header(path)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        return [f"{role} batch {path} is not an npz file ({' '.join(str(err).split()) or type(err).__name__}); "
                f"save it with np.savez(path, arr_0=images)"]
    problems = []
    if header is None:
        stats = "" if role == "sample" else (" (precision and recall need the reference images"
                                              + ("" if {"mu_s", "sigma_s"} <= files else ", and it has no "
                                                 "mu_s/sigma_s to give sFID without them") + ")")
        problems.append(f"{role} batch {path} has no arr_0 (arrays: {sorted(files)}){stats}; it must hold "
                        f"uint8 images N×H×W×3 in arr_0")
    else:
        shape, dtype = header
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[0] == 0:
            problems.append(f"{role} batch {path}: arr_0 is {dtype} of shape {shape}; it must be uint8 N×H×W×3 "
                            f"(NHWC, 0-255), as np.savez(path, arr_0=images) of the ADM suite")
    for metric, pair in STAT_PAIRS.items():
        if len(set(pair) & files) == 1:
            problems.append(f"{role} batch {path} has {sorted(set(pair) & files)[0]} without "
                            f"{sorted(set(pair) - files)[0]}; {metric} needs both (or neither, to compute them)")
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
    problems = batch_problems(args.samples, "sample") + batch_problems(args.reference, "reference")
    try:
        weights = inception_weights_path(args.inception_weights, args.cache_dir) if not problems else None
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
