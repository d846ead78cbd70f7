"""The ADM evaluator's five metrics (openai/guided-diffusion evaluations/evaluator.py) against hand computations.

Every expected value is computed here from the definition in float64 numpy (eigenvalue square roots
for the Fréchet distance, explicit KL sums for IS, full sorted distance matrices for the k-NN radii),
on activations taken from the random Inception by the test's own hook, never from the code under test.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from benchmarks.random_weights import smooth_images
from conftest import ROOT
from ddt import adm_metrics
from ddt.metrics import calculate_metrics, inception_score
from ddt.samples import write_npz

K = 3  # ADM's nhood_sizes=(3,)


def hand_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 − mu2|² + tr σ1 + tr σ2 − 2 tr (σ1^½ σ2 σ1^½)^½, by symmetric eigendecompositions (float64)."""
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root @ sigma2 @ root
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def hand_frechet_of(x1, x2) -> float:
    """The same distance between the statistics of two activation sets without forming D×D matrices:
    σ = AᵀA for the centred rows A / √(n−1), so tr (σ1σ2)^½ is the sum of singular values of A1A2ᵀ."""
    a1, a2 = (np.asarray(x, np.float64) for x in (x1, x2))
    c1, c2 = (a - a.mean(0) for a in (a1, a2))
    c1, c2 = c1 / np.sqrt(len(a1) - 1), c2 / np.sqrt(len(a2) - 1)
    nuclear = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum()
    return float(((a1.mean(0) - a2.mean(0)) ** 2).sum() + (c1 ** 2).sum() + (c2 ** 2).sum() - 2 * nuclear)


def hand_stats(x):
    x = np.asarray(x, np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


def hand_split_is(logits, split_size):
    """exp(mean_i KL(p_i || mean p)) per consecutive split, then the mean over splits (float64)."""
    scores = []
    for start in range(0, len(logits), split_size):
        z = np.asarray(logits[start:start + split_size], np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        marginal = p.mean(0)
        kl = [np.sum(np.where(row > 0, row * (np.log(row) - np.log(marginal)), 0.0)) for row in p]  # 0·log 0 = 0
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores)), scores


def hand_precision_recall(reference, samples):
    """k-NN balls from the full sorted float64 squared-distance matrices (the point itself is the 0th)."""
    ref, smp = np.asarray(reference, np.float64), np.asarray(samples, np.float64)
    radius_ref = np.sort(cdist(ref, ref, "sqeuclidean"), 1)[:, K]
    radius_smp = np.sort(cdist(smp, smp, "sqeuclidean"), 1)[:, K]
    between = cdist(ref, smp, "sqeuclidean")
    return float((between <= radius_ref[:, None]).any(0).mean()), float((between <= radius_smp[None, :]).any(1).mean())


#################################################################################
#                  sFID, FID, IS on the random Inception                        #
#################################################################################

@pytest.fixture(scope="module")
def inception_case(random_inception, tmp_path_factory):
    """Reference and sample images, their activations by this test's own hook, and a reference npz."""
    from torch_fidelity.utils import create_feature_extractor

    reference = smooth_images(48, 32, seed=1)
    samples = smooth_images(40, 32, seed=2)  # other images of the same kind: the spatial order decides sFID
    extractor = create_feature_extractor("inception-v3-compat", ["2048", "logits_unbiased"], cuda=False,
                                         feature_extractor_weights_path=str(random_inception))
    maps = []
    hook = extractor.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: maps.append(out.clone()))

    def activations(images):
        maps.clear()
        with torch.no_grad():
            pool, logits = extractor(images)
        spatial = maps[0][:, :7].double().numpy()  # (N, 7, 17, 17)
        return {"pool": pool.double().numpy(), "logits": logits.double().numpy(),
                "nhwc": spatial.transpose(0, 2, 3, 1).reshape(len(images), -1),
                "nchw": spatial.reshape(len(images), -1)}

    ref, smp = activations(reference), activations(samples)
    hook.remove()
    tmp = tmp_path_factory.mktemp("adm")
    npz = tmp / "VIRTUAL_toy32.npz"
    mu, sigma = hand_stats(ref["pool"])
    mu_s, sigma_s = hand_stats(ref["nhwc"])  # ADM stores mu_s in NHWC order
    np.savez(npz, arr_0=reference.permute(0, 2, 3, 1).numpy(), mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    return {"reference": reference, "samples": samples, "ref": ref, "smp": smp, "npz": npz, "tmp": tmp,
            "weights": random_inception}


def test_sfid_fid_and_adm_is_equal_hand_computations_and_a_nchw_flatten_would_fail(inception_case):
    case = inception_case
    ref, smp = case["ref"], case["smp"]
    assert ref["nhwc"].shape == (48, 17 * 17 * 7)
    assert ref["pool"].std(0).mean() > 0.05  # the random Inception's features spread (not ~1e-8)
    metrics = calculate_metrics(case["samples"], case["npz"], feature_extractor="inception-v3-compat",
                                weights_path=case["weights"], cache_dir=case["tmp"] / "cache",
                                reference_name=case["npz"].stem, verbose=False)
    fid = hand_frechet_of(smp["pool"], ref["pool"])  # the npz's mu/sigma are these reference statistics
    sfid = hand_frechet_of(smp["nhwc"], ref["nhwc"])
    sfid_nchw = hand_frechet_of(smp["nchw"], ref["nhwc"])  # samples flattened NCHW against NHWC mu_s
    isc, _ = hand_split_is(smp["logits"], 5000)
    print(f"sFID {metrics['sfid']:.6f} vs hand {sfid:.6f} (NCHW flatten: {sfid_nchw:.4f}); FID {metrics['fid']:.6f} "
          f"vs hand {fid:.6f}; IS {metrics['isc_mean']:.8f} vs hand {isc:.8f}")
    assert metrics["sfid"] == pytest.approx(sfid, rel=1e-4)
    assert metrics["fid"] == pytest.approx(fid, rel=1e-4)
    assert abs(sfid_nchw - sfid) > 0.05 * sfid  # the wrong order is far from the right one
    assert metrics["sfid"] != pytest.approx(sfid_nchw, rel=0.01)
    assert metrics["isc_mean"] == pytest.approx(isc, rel=1e-6) and isc > 1.2  # one split of 40
    assert metrics["isc_std"] == 0.0
    exact = hand_precision_recall(ref["pool"], smp["pool"])
    print(f"precision/recall {metrics['precision']:.4f}/{metrics['recall']:.4f} "
          f"vs float64 {exact[0]:.4f}/{exact[1]:.4f}")
    assert (metrics["precision"], metrics["recall"]) == pytest.approx(exact, abs=1 / 40 + 1e-9)  # a point at most


def test_without_mu_s_sfid_comes_from_the_reference_images_and_digits_have_a_spatial_analogue(tmp_path):
    """The digits classifier's spatial features: its second conv after the ReLU (8×8×64), 7 channels, NHWC."""
    from ddt.data.digits import load_digits
    from ddt.models.digits_classifier import DigitsClassifier, shipped_weights

    images = load_digits(16)[0]
    reference, samples = images[:500], images[1000:1200]
    path = shipped_weights()[0]
    state = torch.load(path, weights_only=True)
    net = DigitsClassifier(**state["config"])
    net.load_state_dict(state["state_dict"])
    maps = []
    net.conv[3].register_forward_hook(lambda m, i, out: maps.append(out.clone()))
    with torch.no_grad():
        net(reference), net(samples)
    nhwc = [m[:, :7].double().numpy().transpose(0, 2, 3, 1).reshape(len(m), -1) for m in maps]
    npz = tmp_path / "digits_no_spatial_stats.npz"
    np.savez(npz, arr_0=reference.permute(0, 2, 3, 1).numpy())  # images only: both statistics from them
    metrics = calculate_metrics(samples, npz, feature_extractor="digits-classifier", weights_path=path,
                                cache_dir=tmp_path, reference_name="digits", prc=False, isc=False, verbose=False)
    assert nhwc[0].shape == (500, 8 * 8 * 7)
    assert metrics["sfid"] == pytest.approx(hand_frechet_of(nhwc[1], nhwc[0]), rel=1e-6)


@pytest.mark.parametrize("n", [40, 100])
def test_frechet_distance_equals_the_eigenvalue_definition_with_fewer_or_more_samples_than_dimensions(n):
    rng = np.random.default_rng(n)
    x1 = np.maximum(rng.normal(0.2, 1, (n, 64)), 0).astype(np.float32)
    x2 = np.maximum(rng.normal(0.0, 1.2, (300, 64)), 0)
    mu2, sigma2 = hand_stats(x2)
    expected = hand_frechet(*hand_stats(x1), mu2, sigma2)
    assert adm_metrics.frechet_distance_of(x1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)
    assert adm_metrics.frechet_distance(*adm_metrics.statistics(x1), mu2, sigma2) == pytest.approx(expected, rel=1e-6)
    assert hand_frechet_of(x1, x2) == pytest.approx(expected, rel=1e-7)


#################################################################################
#                     Inception Score: consecutive splits                       #
#################################################################################

def test_consecutive_split_is_equals_the_hand_value_and_differs_from_the_shuffled_one():
    rng = np.random.default_rng(0)
    classes = 1008
    # Three regimes in sample order: 5000 confident and diverse, 5000 confident on 20 classes, 2000 vague.
    labels = np.concatenate([rng.integers(0, classes, 5000), rng.integers(0, 20, 5000), rng.integers(0, classes, 2000)])
    scale = np.concatenate([np.full(5000, 8.0), np.full(5000, 8.0), np.full(2000, 1.0)])
    logits = rng.normal(0, 1, (12000, classes))
    logits[np.arange(12000), labels] += scale
    expected, scores = hand_split_is(logits, 5000)
    mean, std = adm_metrics.inception_score(logits)
    shuffled = inception_score(logits.astype(np.float32), "torch_fidelity")["isc_mean"]
    print(f"IS consecutive splits {mean:.10f} vs hand {expected:.10f} (splits {np.round(scores, 3).tolist()}); "
          f"torch-fidelity's shuffled 10 splits {shuffled:.4f}")
    assert len(scores) == 3 and mean == pytest.approx(expected, rel=1e-10) and std == pytest.approx(np.std(scores))
    assert abs(shuffled - mean) > 0.1 * mean
    assert inception_score(logits, "adm")["isc_mean"] == pytest.approx(expected, rel=1e-10)


#################################################################################
#                  Precision / recall: float16 distances vs float64             #
#################################################################################

def pool_like(n: int, shift: float, seed: int) -> np.ndarray:
    """ReLU features at Inception-pool scale (2048-d, ~40% nonzero, mean ~0.35, |x|² ~ 1000) on a 64-d manifold."""
    mixing = np.random.default_rng(99).normal(0, 1, (64, 2048))
    offset = np.random.default_rng(98).normal(-0.3, 0.3, 2048)
    z = np.random.default_rng(seed).normal(shift, 1, (n, 64))
    return np.maximum(z @ mixing * 0.15 + offset, 0).astype(np.float32)


def torch_half_distances(u, v) -> np.ndarray:
    """ADM's _batch_pairwise_distances with every tensor in float16 (torch's CPU half arithmetic)."""
    u, v = torch.from_numpy(u).half(), torch.from_numpy(v).half()
    norm_u, norm_v = (u * u).sum(1).reshape(-1, 1), (v * v).sum(1).reshape(1, -1)
    return torch.clamp(norm_u - 2 * (u @ v.T) + norm_v, min=0).float().numpy()


def test_precision_recall_agree_with_a_float64_brute_force_and_with_float16_distances():
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    reference, samples = pool_like(2000, 0.0, 1), pool_like(2000, 0.25, 2)
    precision, recall = adm_metrics.precision_recall(reference, samples)
    exact = hand_precision_recall(reference, samples)
    ours = adm_metrics.pairwise_distances(reference[:500], samples[:500])
    half = torch_half_distances(reference[:500], samples[:500])
    wide = cdist(reference[:500].astype(np.float64), samples[:500].astype(np.float64), "sqeuclidean")
    fidelity = calculate_precision_recall_full(torch.from_numpy(samples), torch.from_numpy(reference))
    print(f"precision/recall ADM float16 {precision:.4f}/{recall:.4f}, float64 brute force {exact[0]:.4f}/"
          f"{exact[1]:.4f} (max |d| {max(abs(precision - exact[0]), abs(recall - exact[1])):.4f}); torch-fidelity "
          f"float32 {fidelity[0]:.4f}/{fidelity[1]:.4f}; squared distances: ours vs torch float16 max rel "
          f"{np.abs(ours - half).max() / wide.max():.2e}, "
          f"vs float64 max rel {np.abs(ours - wide).max() / wide.max():.2e}")
    assert 0.2 < exact[0] < 0.9 and 0.2 < exact[1] < 0.9  # neither trivially 0 nor 1
    assert abs(precision - exact[0]) <= 0.005 and abs(recall - exact[1]) <= 0.005  # float16 moves a few points
    assert np.abs(ours - half).max() <= 2 * np.spacing(np.float16(wide.max()))  # a float16 rounding or two
    assert np.abs(ours - wide).max() / wide.max() < 2e-3  # float16's resolution


def test_float16_overflow_falls_back_to_float32_distances():
    reference, samples = pool_like(300, 0.0, 3) * 40, pool_like(300, 0.25, 4) * 40  # |x|² ~ 1.6e6 > 65504
    d = adm_metrics.pairwise_distances(reference, samples)
    assert d.dtype == np.float32 and np.isfinite(d).all()
    wide = cdist(reference.astype(np.float64), samples.astype(np.float64), "sqeuclidean")
    assert np.abs(d - wide).max() / wide.max() < 1e-5
    assert adm_metrics.precision_recall(reference, samples) == pytest.approx(hand_precision_recall(reference, samples),
                                                                           abs=1 / 300 + 1e-9)


#################################################################################
#                 The scoring command and the reference cache                   #
#################################################################################

def score(*args, cache_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ddt.evaluate", *map(str, args), "--cache-dir", str(cache_dir)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_the_scoring_command_prints_and_writes_the_five_metrics_of_a_suite_npz(inception_case):
    case = inception_case
    samples = case["tmp"] / "samples.npz"
    write_npz(case["samples"].permute(0, 2, 3, 1).numpy(), np.arange(len(case["samples"])) % 10, samples)
    out = case["tmp"] / "metrics.json"
    proc = score(samples, case["npz"], "--inception-weights", case["weights"], "--out", out,
                 cache_dir=case["tmp"] / "cache")  # the reference activations cached by the test above
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert list(lines) == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    written = json.loads(out.read_text())
    smp, ref = case["smp"], case["ref"]
    expected = {"fid": hand_frechet_of(smp["pool"], ref["pool"]), "sfid": hand_frechet_of(smp["nhwc"], ref["nhwc"]),
                "isc_mean": hand_split_is(smp["logits"], 5000)[0]}
    expected["precision"], expected["recall"] = hand_precision_recall(case["ref"]["pool"], smp["pool"])
    for key, value in expected.items():
        assert written[key] == pytest.approx(value, rel=1e-4, abs=1e-9), key
    assert float(lines["sFID"]) == written["sfid"] and written["isc_protocol"] == "adm"
    assert written["num_samples"] == 40 and "cache entry" in proc.stderr


@pytest.mark.parametrize("broken", ["no_arr_0+not_npz", "float32+no_stats_no_images", "no_channels"])
def test_the_scoring_command_refuses_broken_batches_with_one_line_each(inception_case, broken):
    tmp = case_dir = inception_case["tmp"] / broken
    case_dir.mkdir(exist_ok=True)
    images = np.zeros((4, 8, 8, 3), np.uint8)
    samples, reference = tmp / "samples.npz", tmp / "reference.npz"
    expected = []
    if broken == "no_arr_0+not_npz":
        np.savez(samples, images=images)
        reference.write_text("not an npz")
        expected = ["sample batch .*samples.npz has no arr_0", "reference batch .*reference.npz is not an npz"]
    elif broken == "float32+no_stats_no_images":
        np.savez(samples, arr_0=images.astype(np.float32))
        np.savez(reference, mu=np.zeros(2048), sigma=np.eye(2048))
        expected = ["arr_0 is float32 of shape \\(4, 8, 8, 3\\); it must be uint8",
                    "reference batch .*has no arr_0.*no mu_s/sigma_s"]
    else:
        np.savez(samples, arr_0=images[..., 0])
        reference = inception_case["npz"]
        expected = ["arr_0 is uint8 of shape \\(4, 8, 8\\); it must be uint8 N×H×W×3"]
    proc = score(samples, reference, "--inception-weights", inception_case["weights"], cache_dir=tmp / "cache")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert len(lines) == len(expected)
    for line, pattern in zip(lines, expected):
        assert line.startswith("error: ")
        assert __import__("re").search(pattern, line), line


def test_a_reference_npz_replaced_at_the_same_path_is_recomputed(tmp_path, caplog):
    import logging

    from ddt.data.digits import load_digits
    from ddt.models.digits_classifier import shipped_weights

    images = load_digits(16)[0]
    path = tmp_path / "reference.npz"
    kwargs = dict(feature_extractor="digits-classifier", weights_path=shipped_weights()[0], cache_dir=tmp_path / "c",
                  reference_name="ref", verbose=False)
    samples = images[:300]
    caplog.set_level(logging.INFO, logger="ddt.metrics")
    np.savez(path, arr_0=images[:600].permute(0, 2, 3, 1).numpy())
    first = calculate_metrics(samples, path, **kwargs)
    np.savez(path, arr_0=images[900:1500].permute(0, 2, 3, 1).numpy())  # other images, same path and name
    second = calculate_metrics(samples, path, **kwargs)
    again = calculate_metrics(samples, path, **kwargs)
    entries = sorted((tmp_path / "c" / "reference").glob("*.npz"))
    assert len(entries) == 2 and first["fid"] != second["fid"] and again == second
    logged = [r.getMessage() for r in caplog.records if "cache entry" in r.getMessage()]
    assert [m.split()[2] for m in logged] == ["new", "new", "cache"]  # "reference features: new cache entry ..."
    assert logged[1].split()[-1] == logged[2].split()[-1] and logged[0].split()[-1] != logged[1].split()[-1]
