"""The ImageNet path end to end at toy size: latent cache -> REPA training -> VAE decoding -> Inception FID.

Every pretrained component is a small or randomly initialised model saved the way the real one
ships (a save_pretrained AutoencoderKL folder, a DINOv2-architecture timm weights file, an Inception
state dict), loaded through the same code a cluster run uses.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import launch
from ddt.data.imagenet import ImageFolder
from ddt.runner import run
from tiny import TINY_DINOV2, save_image_folder

TINY_MODEL = ["model=ddt_s", "model.depth=4", "model.encoder_depth=3", "model.hidden_size=32", "model.num_heads=2"]
SHORT = ["train=smoke", "train.batch_size=4", "eval.num_samples=12", "sampler.num_steps=2", "sampler.batch_size=6",
         "eval.feature_batch_size=12", "data.num_workers=0", "data.shard_size=8", "data.num_classes=3",
         "progress=false"]


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory, tiny_vae, tiny_dinov2, random_inception):
    """A 3-class image folder (one corrupt file), its ADM-style reference npz, and the overrides to use them."""
    from torch_fidelity.utils import create_feature_extractor

    root = save_image_folder(tmp_path_factory.mktemp("imagenet") / "train")
    folder = ImageFolder(root, 32)
    images = torch.stack([img for img in map(folder.read, range(len(folder))) if img is not None])
    extractor = create_feature_extractor("inception-v3-compat", ["2048"], cuda=False,
                                         feature_extractor_weights_path=str(random_inception))
    with torch.no_grad():
        features = extractor(images)[0].double().numpy()
    npz = root.parent / "VIRTUAL_toy32.npz"
    np.savez(npz, arr_0=images.permute(0, 2, 3, 1).numpy(), mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    overrides = ["resolution=r256", "resolution.image_size=32", "resolution.latent_size=4", f"resolution.vae={tiny_vae}",
                 f"data.root={root}", f"eval.inception_weights={random_inception}", f"eval.reference_npz={npz}",
                 f"cache_dir={root.parent / 'cache'}", *TINY_MODEL, *SHORT]
    repa = ["repa=on", "repa.target_encoder=vit_small_patch14_dinov2", f"repa.target_weights={tiny_dinov2}",
            "repa.target_kwargs={" + ",".join(f"{k}:{v}" for k, v in TINY_DINOV2.items()) + "}",
            "repa.align_layer=2", "repa.projector_dim=16"]
    return {"root": root, "overrides": overrides, "repa": repa, "num_images": len(images)}


def test_cache_then_repa_training_sampling_and_fid_against_the_reference_batch(imagenet, tmp_path):
    base = imagenet["overrides"]
    launch(*base, "stage=cache_latents", f"hydra.run.dir={tmp_path / 'cache_run'}")
    cached = json.loads((tmp_path / "cache_run" / "results.json").read_text())["cache_latents"]
    assert cached["images_encoded"] == imagenet["num_images"] == 18 and cached["images_unreadable"] == 1
    assert cached["shards_total"] == 3 and cached["shards_written"] == 3

    run_dir = tmp_path / "run"
    launch(*base, *imagenet["repa"], "eval.every_steps=2", f"hydra.run.dir={run_dir}")  # + a curve point at step 2
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["train"]["step"] == 4
    assert results["train"]["final_repa_loss"] > 0 and results["train"]["final_fm_loss"] > 0
    assert results["sample"]["num_samples"] == 12
    assert Image.open(run_dir / "samples" / "000011.png").size == (32, 32)  # decoded by the VAE
    assert np.load(run_dir / "samples" / "samples.npz")["arr_0"].shape == (12, 32, 32, 3)
    metrics = results["metrics"]
    assert np.isfinite(metrics["fid"]) and metrics["fid"] > 0 and 0 <= metrics["precision"] <= 1
    assert results["evaluate"]["reference"] == "VIRTUAL_toy32" and results["evaluate"]["isc_protocol"] == "adm"
    adm_five = ("fid", "sfid", "isc_mean", "precision", "recall")  # the ADM evaluator's (sFID from the npz's images)
    assert all(np.isfinite(metrics[k]) for k in adm_five) and metrics["sfid"] > 0 and metrics["isc_mean"] > 1
    curve = results["curve"]
    assert [p["step"] for p in curve] == [2, 4] and [p["final"] for p in curve] == [False, True]
    for point in curve:
        assert all(np.isfinite(point[k]) for k in adm_five) and point["isc_protocol"] == "adm"
    print("toy ImageNet run, final metrics:", {k: round(metrics[k], 4) for k in adm_five})
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert set(state["objective"]) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}

    again = launch(*base, *imagenet["repa"], "eval.reference=dataset", f"hydra.run.dir={run_dir}")
    resumed = json.loads((run_dir / "results.json").read_text())
    assert resumed["train"]["steps_this_session"] == 0 and resumed["sample"]["generated"] == 0
    assert resumed["evaluate"]["reference"] == "imagenet32-19" and np.isfinite(resumed["metrics"]["fid"])
    assert "skipping undecodable image" in again.stdout + again.stderr  # the reference set replaces the broken file


def test_training_on_images_encodes_with_the_vae_on_the_fly(imagenet, compose, tmp_path):
    overrides = [o for o in imagenet["overrides"] if not o.startswith("data.shard_size")]  # no cache here
    cfg = compose(*overrides, "data=imagenet", "stage=train", "train.max_steps=2")
    results = run(cfg, tmp_path)
    assert results["status"] == "completed" and results["train"]["step"] == 2
    assert np.isfinite(results["train"]["final_loss"])


@pytest.mark.parametrize("override,message", [
    ("repa.target_weights={missing}/dinov2.safetensors", "repa.target_weights=.*dinov2.safetensors"),
    ("resolution.vae={missing}/sd-vae", "resolution.vae=.*sd-vae.*save_pretrained"),
    ("eval.reference_npz={missing}/VIRTUAL_imagenet256_labeled.npz", "VIRTUAL_imagenet256_labeled.npz.*ref_batches"),
    ("data.latents_dir={missing}/latents", "meta.json|stage=cache_latents"),
    ("data.root={missing}/train", "data.root=.*train"),
])
def test_missing_weights_or_data_fail_before_any_work(imagenet, compose, tmp_path, override, message):
    run(compose(*imagenet["overrides"], "stage=cache_latents"), tmp_path / "cache_run")  # complete (resumes)
    cfg = compose(*imagenet["overrides"], *imagenet["repa"], override.format(missing=tmp_path / "missing"))
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"
