"""Scoring a digits batch as the quickstart does raises no library warning (issue 41, item 7).

The causes: PIL hands numpy read-only pixels (torch warns on sharing them), and the digits classifier's
dead ReLU units make both covariances singular (SciPy >= 1.16 warns in sqrtm, whatever `disp` says).
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from scipy.linalg import LinAlgWarning, sqrtm

from conftest import ROOT
from ddt import adm_metrics

# torch warns about read-only arrays once per process, so a fresh one scores: an earlier test cannot hide it.
SCORE_DIGITS = textwrap.dedent("""
    import sys
    from pathlib import Path

    from PIL import Image

    from ddt.data.digits import load_digits
    from ddt.metrics import calculate_metrics
    from ddt.models.digits_classifier import shipped_weights

    tmp = Path(sys.argv[1])
    images = load_digits(16)[0]
    (tmp / "samples").mkdir()
    for i, image in enumerate(images[:500]):  # the quickstart's count: more than the 448 sFID dimensions
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp / "samples" / f"{i:06d}.png")
    metrics = calculate_metrics(tmp / "samples", images[500:], feature_extractor="digits-classifier",
                                weights_path=shipped_weights()[0], cache_dir=tmp / "cache", verbose=False)
    print(metrics["fid"], metrics["sfid"])
""")


def test_scoring_a_digits_folder_raises_no_warning(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-W", "error::UserWarning", "-W", "error::RuntimeWarning",
                           "-W", "error::DeprecationWarning", "-c", SCORE_DIGITS, str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr
    fid, sfid = map(float, proc.stdout.split())
    assert fid > 0 and sfid > 0


@pytest.mark.filterwarnings("error")
def test_the_frechet_distance_of_dead_relu_units_is_exact_and_silent():
    """Units that are 0 on every image (as 29 of the digits classifier's 64) make σ1σ2 singular."""
    rng = np.random.default_rng(0)
    live = rng.normal(0.3, 1, (500, 64)) @ rng.normal(0, 0.3, (64, 64))
    x1, x2 = np.maximum(live, 0), np.maximum(live[::-1] * 1.2 + 0.1, 0)
    x1[:, :29] = x2[:, :29] = 0
    with pytest.warns(LinAlgWarning):  # the cause: what ADM's sqrtm meets on these statistics
        sqrtm(np.cov(x1, rowvar=False) @ np.cov(x2, rowvar=False))
    (mu1, sigma1), (mu2, sigma2) = adm_metrics.statistics(x1), adm_metrics.statistics(x2)
    # Only the 35 live units carry covariance, where σ1 is invertible: tr (σ1σ2)^½ from those alone.
    s1, s2 = sigma1[29:, 29:], sigma2[29:, 29:]
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(w)) @ v.T
    trace = np.sqrt(np.linalg.eigvalsh(root @ s2 @ root)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace
    assert adm_metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
    assert adm_metrics.frechet_distance_of(x1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_a_covariance_that_is_not_one_fails_as_adm_on_an_imaginary_part():
    sigma = np.diag([1.0, -4.0])  # a corrupt reference sigma: sqrtm would be complex
    with pytest.raises(ValueError, match="imaginary component"):
        adm_metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), sigma)
