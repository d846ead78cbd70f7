"""FD-DINOv2 (eval.fd_dinov2): torch-fidelity's DINOv2 extractor with its network from a local file.

The real DINOv2 weights cannot be downloaded here, so every test uses the real architecture of the
smallest extractor torch-fidelity offers (dinov2-vit-s-14: timm's DINOv2 ViT-S/14) with random
weights, saved in the official layout (a plain state dict with the 37x37 position embedding and
mask_token, as dl.fbaipublicfiles.com ships it) and loaded through the suite's own code.
"""
import json

import pytest
import torch

from ddt.config import validate
from ddt.data.digits import load_digits
from ddt.errors import UsageError
from ddt.extractors import build_dinov2, dinov2_weights_path
from ddt.metrics import fd_dinov2
from ddt.runner import run
from tiny import save_image_folder

MODEL = "dinov2-vit-s-14"
URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"


def save_random_dinov2(path, seed: int = 0):
    """Random ViT-S/14 weights in the official DINOv2 file layout."""
    import timm

    torch.manual_seed(seed)
    net = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518, num_classes=0)
    state = net.state_dict()
    # timm initialises LayerScale at 1e-5: every block would be nearly the identity and the CLS feature
    # almost independent of the image. Trained DINOv2 scales are of order 0.1-1, so use 1.
    state = {k: torch.ones_like(v) if k.endswith(".gamma") else v for k, v in state.items()}
    state["mask_token"] = torch.zeros(1, net.embed_dim)  # in the official file, unused at inference
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_random_dinov2(tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_pretrain.pth")


@pytest.fixture(scope="module")
def digits():
    return load_digits(16)[0]


def noise_like(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, images.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_fd_dinov2_of_a_set_against_itself_is_zero_and_against_noise_large(digits, weights, tmp_path):
    images = digits[:24]
    kwargs = dict(model=MODEL, weights_path=weights, cache_dir=tmp_path, reference_name="digits24", batch_size=24,
                  verbose=False)
    same = fd_dinov2(images, images, **kwargs)
    far = fd_dinov2(noise_like(images), images, **kwargs)
    print(f"FD-DINOv2 (random ViT-S/14, 24 digits): self {same:.3g}, noise {far:.4g}")
    # Self: identical features on both sides, so mu cancels exactly and only the float64 eigenvalues of
    # sigma @ sigma differ from sigma's own (about 1e-5 here, against traces of order 100): 1e-3 is loose.
    assert abs(same) < 1e-3
    assert far > 100


def test_the_weights_file_is_honoured_and_a_bad_file_is_refused(digits, weights, tmp_path):
    images, noise = digits[:8], noise_like(digits[:8])
    other = save_random_dinov2(tmp_path / "other_pretrain.pth", seed=1)
    kwargs = dict(model=MODEL, cache_dir=tmp_path, reference_name="digits8", batch_size=8, verbose=False)
    first = fd_dinov2(noise, images, weights_path=weights, **kwargs)
    again = fd_dinov2(noise, images, weights_path=weights, **kwargs)  # reference features from the cache
    changed = fd_dinov2(noise, images, weights_path=other, **kwargs)
    assert first == pytest.approx(again, rel=1e-6) and abs(changed - first) > 1e-3 * first

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(RuntimeError, match="eval.dinov2_weights=.*corrupt.pth is not a readable plain state dict"):
        build_dinov2(MODEL, corrupt)
    pickled = tmp_path / "pickled.pth"
    torch.save({"fn": print}, pickled)  # an arbitrary object: refused by weights_only loading
    with pytest.raises(RuntimeError, match="pickled.pth is not a readable plain state dict"):
        dinov2_weights_path(str(pickled), tmp_path, MODEL)
    with pytest.raises(RuntimeError, match="does not hold dinov2-vit-b-14.*set eval.dinov2_model"):
        dinov2_weights_path(str(weights), tmp_path, "dinov2-vit-b-14")  # ViT-S weights for ViT-B
    assert dinov2_weights_path(str(weights), tmp_path, MODEL) == weights


def test_missing_weights_name_the_file_and_where_to_download_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=f"eval.dinov2_weights=.*nowhere.pth does not exist. Download {URL}"):
        dinov2_weights_path(str(tmp_path / "nowhere.pth"), tmp_path, MODEL)
    expected = tmp_path / "dinov2_vits14_pretrain.pth"
    with pytest.raises(FileNotFoundError, match=f"HF_HUB_OFFLINE.*Download {URL}.*{expected}"):
        dinov2_weights_path(None, tmp_path, MODEL)


def test_the_adm_reference_batch_is_refused_before_any_work(compose, tmp_path):
    cfg = compose("resolution=r256", "data=imagenet", f"data.root={tmp_path}", "eval.fd_dinov2=true")
    with pytest.raises(UsageError, match="eval.reference=adm_npz\\) holds only Inception .*eval.reference=dataset"):
        validate(cfg)
    with pytest.raises(UsageError):
        run(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_digits_compare_dinov2_features_of_the_samples_with_the_digits_reference(compose, weights, digits):
    from ddt.components import prepare

    cfg = compose("eval.fd_dinov2=true", f"eval.dinov2_model={MODEL}", f"eval.dinov2_weights={weights}")
    parts = prepare(validate(cfg), ["evaluate"])
    assert parts.dinov2["name"] == MODEL and parts.dinov2["weights"] == str(weights)
    assert len(parts.dinov2["sha256"]) == 64
    assert torch.equal(parts.reference, digits)  # the same 1,797 images FID compares with


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, tiny_vae, random_inception, weights):
    """A toy ImageNet run (image folder, tiny VAE, random Inception and DINOv2) with eval.fd_dinov2=true."""
    from hydra import compose, initialize_config_dir

    from conftest import ROOT
    from ddt.config import register_resolvers

    root = save_image_folder(tmp_path_factory.mktemp("imagenet") / "train", classes=2, per_class=4, corrupt=False)
    overrides = ["resolution=r256", "resolution.image_size=32", "resolution.latent_size=4",
                 f"resolution.vae={tiny_vae}", "data=imagenet", f"data.root={root}", "data.num_classes=2",
                 "data.num_workers=0",
                 "model=ddt_s", "model.depth=2", "model.encoder_depth=1", "model.hidden_size=32", "model.num_heads=2",
                 "train=smoke", "train.max_steps=2", "train.batch_size=4", "sampler.num_steps=2",
                 "sampler.batch_size=8", "eval.num_samples=8", "eval.feature_batch_size=8", "eval.prc=false",
                 "eval.kid=false", f"eval.inception_weights={random_inception}", "eval.reference=dataset",
                 "eval.fd_dinov2=true", f"eval.dinov2_model={MODEL}", f"eval.dinov2_weights={weights}",
                 f"cache_dir={root.parent / 'cache'}", "progress=false"]
    register_resolvers()

    def cfg(*extra):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            return compose("config", overrides=[*overrides, *extra])

    run_dir = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        seen = count_dinov2_images(patch)
        results = run(cfg(), run_dir)
    return {"cfg": cfg, "run_dir": run_dir, "results": results, "seen": seen,
            "cache": root.parent / "cache" / "fidelity"}


def count_dinov2_images(monkeypatch) -> list[int]:
    """Patch torch-fidelity's DINOv2 forward (which the file-loaded extractor inherits) to count images."""
    from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2

    seen, forward = [], FeatureExtractorDinoV2.forward
    monkeypatch.setattr(FeatureExtractorDinoV2, "forward", lambda self, x: seen.append(len(x)) or forward(self, x))
    return seen


def test_a_run_with_fd_dinov2_writes_it_to_results_json(toy_run):
    assert toy_run["results"]["status"] == "completed"
    results = json.loads((toy_run["run_dir"] / "results.json").read_text())
    metrics = results["metrics"]
    assert metrics["fd_dinov2"] > 0 and metrics["fid"] > 0 and metrics["fd_dinov2"] != metrics["fid"]
    assert results["evaluate"]["fd_dinov2_extractor"]["name"] == MODEL
    assert sum(toy_run["seen"]) == 8 + 8  # the reference folder's 8 images, then the 8 samples


def test_the_reference_features_are_cached_and_a_second_evaluation_reuses_them(toy_run, monkeypatch):
    (cached,) = [p for p in toy_run["cache"].glob(f"imagenet32-8-{MODEL}-file-*") if "features" in p.name]
    stamp = cached.stat().st_mtime_ns
    seen = count_dinov2_images(monkeypatch)
    again = run(toy_run["cfg"]("stage=evaluate"), toy_run["run_dir"])  # last.pt again, the same samples
    assert again["status"] == "completed" and again["sample"]["generated"] == 0
    assert sum(seen) == 8 and cached.stat().st_mtime_ns == stamp  # only the samples went through DINOv2
    assert again["metrics"]["fd_dinov2"] == pytest.approx(toy_run["results"]["metrics"]["fd_dinov2"], rel=1e-6)
