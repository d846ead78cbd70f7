"""The ADM evaluator's metrics with the digits feature extractor, sample files and error messages."""
import numpy as np
import pytest
import torch
from PIL import Image

from ddt.data.digits import load_digits
from ddt.extractors import inception_weights_path
from ddt.metrics import calculate_metrics
from ddt.samples import read_samples, write_grid, write_npz
from ddt.models import digits_classifier as shipped


@pytest.fixture(scope="module")
def digits():
    return load_digits(16)


@pytest.fixture
def classifier():
    return shipped.shipped_weights()


def test_the_shipped_classifier_is_checked_against_its_hash_and_accurate_on_held_out_digits(digits, classifier):
    import hashlib

    from ddt.checkpoint import load
    from ddt.models.digits_classifier import DigitsClassifier

    path, digest = classifier
    assert path.name == "digits_classifier-v1.pt" and digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (path.with_suffix(".sha256")).read_text().split()[0] == digest
    state = load(path)  # weights_only=True
    net = DigitsClassifier(**state["config"])
    net.load_state_dict(state["state_dict"])
    images, labels = digits
    held_out = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[: int(len(images) * 0.2)]
    with torch.no_grad():
        accuracy = (net(images[held_out])[1].argmax(1) == labels[held_out]).float().mean().item()
    assert accuracy == pytest.approx(state["test_accuracy"]) and accuracy > 0.95  # the split it was trained without


def test_a_changed_weights_file_or_an_unknown_version_is_refused(tmp_path, monkeypatch):
    import shutil

    path, _ = shipped.shipped_weights()
    monkeypatch.setattr(shipped, "ASSETS", tmp_path)
    shutil.copy(path, tmp_path / path.name)
    shutil.copy(path.with_suffix(".sha256"), tmp_path / path.with_suffix(".sha256").name)
    assert shipped.shipped_weights()[0] == tmp_path / path.name
    with open(tmp_path / path.name, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="SHA-256"):
        shipped.shipped_weights()
    with pytest.raises(FileNotFoundError, match="eval.digits_classifier=v9.*shipped versions: \\['v1'\\]"):
        shipped.shipped_weights("v9")
    with pytest.raises(FileExistsError, match="never overwritten"):
        shipped.write_version("v1", torch.zeros(2, 3, 16, 16, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))


def test_fid_of_a_set_against_itself_is_zero_and_against_noise_large(digits, classifier, cache_dir):
    images, _ = digits
    path, _ = classifier
    kwargs = dict(feature_extractor="digits-classifier", weights_path=path, cache_dir=cache_dir,
                  reference_name="digits16-test", verbose=False)
    same = calculate_metrics(images, images, **kwargs)
    noise = torch.randint(0, 256, images.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    far = calculate_metrics(noise, images, **kwargs)
    assert abs(same["fid"]) < 1e-3 and abs(same["sfid"]) < 1e-3 and far["sfid"] > 1  # sFID: the 8×8×7 conv maps
    assert far["fid"] > 100 * max(same["fid"], 1e-2) and far["fid"] > 50
    assert same["isc_mean"] > 5 and far["isc_mean"] < same["isc_mean"]  # 10 balanced classes vs confusion
    assert same["precision"] > 0.9 and far["precision"] < 0.5 * same["precision"]


def test_samples_npz_grid_and_missing_sample_message(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    for i, image in enumerate(images[:4]):
        Image.fromarray(image).save(tmp_path / f"{i:06d}.png")
    with pytest.raises(FileNotFoundError, match="000004.png"):
        read_samples(tmp_path, 5)
    array = read_samples(tmp_path, 4)
    assert np.array_equal(array, images[:4])
    write_npz(array, np.arange(4), tmp_path / "samples.npz")
    npz = np.load(tmp_path / "samples.npz")
    assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (4, 16, 16, 3)
    assert npz["arr_1"].tolist() == [0, 1, 2, 3]
    write_grid(array, tmp_path / "grid.png", nrow=2)
    assert Image.open(tmp_path / "grid.png").size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)


def test_missing_inception_weights_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.inception_weights=.*nowhere.pth.*weights-inception"):
        inception_weights_path(str(tmp_path / "nowhere.pth"), tmp_path)


def test_local_inception_weights_are_loaded_safely(tmp_path):
    good = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, good)
    assert inception_weights_path(str(good), tmp_path) == good
    bad = tmp_path / "pickle.pth"
    torch.save({"fn": print}, bad)  # an arbitrary object: refused by weights_only loading
    with pytest.raises(RuntimeError, match="not a plain state dict"):
        inception_weights_path(str(bad), tmp_path)


def test_fid_against_a_reference_npz_equals_fid_from_the_raw_features(digits, classifier, cache_dir, tmp_path):
    """ADM-style reference batch: FID uses its mu/sigma, precision/recall its images (arr_0)."""
    from ddt.models.digits_classifier import DigitsClassifier

    images, _ = digits
    path, _ = classifier
    state = torch.load(path, weights_only=True)
    net = DigitsClassifier(**state["config"])
    net.load_state_dict(state["state_dict"])
    with torch.no_grad():
        features = net(images)[0].double().numpy()  # the raw features FID is defined on
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    npz = tmp_path / "VIRTUAL_digits16.npz"
    np.savez(npz, arr_0=images.permute(0, 2, 3, 1).numpy(), mu=mu, sigma=sigma)
    samples = torch.randint(0, 256, (300, 3, 16, 16), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    samples[:200] = images[:200]  # half real, half noise: a FID far from 0 and from the noise-only value
    kwargs = dict(feature_extractor="digits-classifier", weights_path=path, cache_dir=cache_dir, verbose=False)
    from_npz = calculate_metrics(samples, npz, reference_name="digits16-npz", **kwargs)
    from_images = calculate_metrics(samples, images, reference_name="digits16-images", **kwargs)
    assert from_npz["fid"] > 1
    assert from_npz["fid"] == pytest.approx(from_images["fid"], rel=1e-4)
    assert from_npz["precision"] == pytest.approx(from_images["precision"])
    assert from_npz["isc_mean"] == pytest.approx(from_images["isc_mean"])
    assert from_npz["sfid"] == pytest.approx(from_images["sfid"], rel=1e-6)  # no mu_s: from the npz's images
    np.savez(tmp_path / "bad.npz", mu=mu)
    with pytest.raises(ValueError, match="bad.npz has no \\['sigma'\\]"):
        calculate_metrics(samples, tmp_path / "bad.npz", reference_name="bad", **kwargs)
    with pytest.raises(FileNotFoundError, match="VIRTUAL_imagenet256_labeled.npz.*eval.reference_npz"):
        calculate_metrics(samples, tmp_path / "VIRTUAL_imagenet256_labeled.npz", reference_name="x", **kwargs)


def test_a_stop_request_ends_sampling_after_the_batch_and_the_rerun_writes_only_the_rest(tmp_path):
    """What a preemption signal during a curve point does: the images written so far stay, nothing is redone."""
    from ddt.samples import generate_samples
    from ddt.models import build_model

    torch.manual_seed(0)
    model = build_model(in_channels=3, patch_size=4, hidden_size=32, num_heads=2, depth=2, encoder_depth=1,
                        num_classes=10).eval()
    kwargs = dict(num_samples=12, batch_size=4, seed=0, latent_shape=(3, 16, 16), progress=False,
                  sampler_kwargs={"num_steps": 2, "cfg_scale": 1.0})
    calls = []
    first = generate_samples(model, tmp_path, stop=lambda: calls.append(1) or len(calls) > 2, **kwargs)
    assert first["stopped"] and first["generated"] == 8 and len(list(tmp_path.glob("*.png"))) == 8
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.png")}
    rest = generate_samples(model, tmp_path, **kwargs)
    assert not rest["stopped"] and rest["generated"] == 4 and len(list(tmp_path.glob("*.png"))) == 12
    assert {n: (tmp_path / n).stat().st_mtime_ns for n in stamps} == stamps


TINY_RUN = ["model.depth=2", "model.encoder_depth=1", "model.hidden_size=32", "model.num_heads=2",
            "train.max_steps=2", "train.batch_size=8", "train.ckpt_every=1", "sampler.num_steps=2",
            "sampler.batch_size=10", "eval.num_samples=10", "progress=false"]


def test_the_runs_device_reaches_every_scoring(compose, tmp_path, monkeypatch):
    """device=cpu: the curve point at step 1 and the final evaluation score with device=cpu, not a device of
    their own."""
    import ddt.runner
    from ddt.runner import run

    devices, real = [], ddt.runner.calculate_metrics
    monkeypatch.setattr(ddt.runner, "calculate_metrics",
                        lambda *a, **kw: devices.append(kw.get("device")) or real(*a, **kw))
    results = run(compose(*TINY_RUN, "device=cpu", "eval.every_steps=1"), tmp_path / "run")
    assert results["status"] == "completed" and [p["step"] for p in results["curve"]] == [1, 2]
    assert devices == [torch.device("cpu")] * 2


def test_the_metrics_run_on_the_given_device_even_with_a_gpu_present(digits, classifier, cache_dir, monkeypatch):
    """A run told device=cpu on a GPU node: the extractors are built and run on the CPU (FD-DINOv2's too)."""
    import torch_fidelity

    import ddt.metrics
    from ddt.metrics import fd_dinov2

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a busy GPU node
    seen, build, extract = [], ddt.metrics.build_extractor, ddt.metrics.extract_activations
    monkeypatch.setattr(ddt.metrics, "build_extractor",
                        lambda name, weights, device: seen.append(("built", device)) or build(name, weights, device))
    monkeypatch.setattr(ddt.metrics, "extract_activations", lambda images, extractor, **kw: seen.append(
        ("ran", next(extractor.parameters()).device)) or extract(images, extractor, **kw))
    images, _ = digits
    calculate_metrics(images[:50], images[:100], feature_extractor="digits-classifier", weights_path=classifier[0],
                      cache_dir=cache_dir, reference_name="digits100", prc=False, verbose=False, device="cpu")
    # the reference's features may come from the session's cache: then only the samples' are extracted
    assert seen[:2] == [("built", torch.device("cpu")), ("ran", torch.device("cpu"))]
    assert {device for _, device in seen} == {torch.device("cpu")}
    fidelity = {}
    monkeypatch.setattr(torch_fidelity, "calculate_metrics",
                        lambda **kw: fidelity.update(kw) or {"frechet_inception_distance": 0.0})
    fd_dinov2(images[:4], images[:4], model="dinov2-vit-s-14", weights_path=classifier[0], cache_dir=cache_dir,
              verbose=False, device=torch.device("cpu"))
    assert fidelity["cuda"] is False


def test_scoring_reads_exactly_the_runs_images_and_a_folder_holding_others_stops(compose, tmp_path, monkeypatch):
    """The final evaluation scores the eval.num_samples images 000000.png ...; an image beside them (a stray
    extra.png, or 000999.png beyond the count) stops the next command, before any sampling, in one line."""
    import shutil

    import ddt.runner
    from ddt.batches import count_images
    from ddt.errors import UsageError
    from ddt.runner import run
    from ddt.samples import RunSamples

    counted, real = [], ddt.runner.calculate_metrics
    monkeypatch.setattr(ddt.runner, "calculate_metrics",
                        lambda samples, *a, **kw: counted.append(count_images(samples)) or real(samples, *a, **kw))
    run_dir = tmp_path / "run"
    results = run(compose(*TINY_RUN), run_dir)
    samples = run_dir / "samples"
    assert counted == [10] and results["evaluate"]["num_samples"] == 10
    assert [p.name for p in RunSamples(samples, 10).paths] == [f"{i:06d}.png" for i in range(10)]
    for name in ("extra.png", "000999.png", "photo.JPG"):
        shutil.copy(samples / "000000.png", samples / name)
        stamps = {p.name: p.stat().st_mtime_ns for p in samples.glob("*.*[gG]")}  # the images
        with pytest.raises(UsageError) as refused:
            run(compose(*TINY_RUN, "stage=evaluate"), run_dir)
        assert len(refused.value.problems) == 1 and "\n" not in str(refused.value)
        assert (f"samples folder {samples} holds 1 image(s) besides the 10 the run writes (000000.png to "
                f"000009.png): {name}; move them out of {samples}") in str(refused.value)
        assert {p.name: p.stat().st_mtime_ns for p in samples.glob("*.*[gG]")} == stamps  # nothing sampled over them
        with pytest.raises(UsageError, match=name):  # the scorer's own check, as a stage=evaluate after it would meet
            RunSamples(samples, 10)
        (samples / name).unlink()
    assert len(counted) == 1
    # A smaller eval.num_samples over the same folder: the images beyond its count are not the run's.
    with pytest.raises(UsageError, match="holds 2 image\\(s\\) besides the 8 .*: 000008.png, 000009.png;"):
        RunSamples(samples, 8)
