"""The ImageNet folder reader and the SD-VAE latent cache: crop, listing, round trip, ranks, kill/resume.

Run: HF_HUB_OFFLINE=1 python -m pytest tests/test_latents.py -q
"""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from ddt.data.imagenet import ImageFolder, center_crop_arr
from ddt.data.latents import LatentDataset, cache_latents, latent_cache_status, shard_path
from ddt.models.vae import LatentCodec

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # tiny VAE downsamples 8x: latents (4, 4, 4)
# (class, relative name, (width, height), mode); sizes vary so the crop takes every path.
IMAGES = [
    ("cat", "a.png", (40, 50), "RGB"), ("cat", "b.jpg", (64, 48), "RGB"), ("cat", "C.JPEG", (33, 80), "RGB"),
    ("cat", "img_10.png", (96, 96), "RGB"), ("cat", "img_9.png", (130, 70), "RGB"),
    ("cat", "sub/d.png", (32, 32), "RGB"), ("cat", "e.webp", (20, 30), "RGB"), ("cat", "f.bmp", (70, 45), "RGB"),
    ("dog", "a.png", (50, 40), "L"), ("dog", "b.png", (48, 64), "RGBA"), ("dog", "c.jpeg", (80, 33), "RGB"),
    ("dog", "d.png", (64, 64), "RGB"), ("dog", "e.png", (45, 70), "RGB"), ("dog", "f.jpg", (100, 36), "RGB"),
    ("dog", "g.png", (36, 100), "RGB"), ("dog", "h.png", (66, 66), "RGB"),
    ("fish", "a.png", (40, 50), "RGB"), ("fish", "b.png", (64, 48), "RGB"), ("fish", "c.png", (33, 80), "RGB"),
    ("fish", "d.jpg", (96, 96), "RGB"), ("fish", "e.png", (130, 70), "RGB"), ("fish", "f.png", (32, 32), "RGB"),
    ("fish", "h.png", (70, 45), "RGB"), ("fish", "i.png", (50, 40), "RGB"), ("fish", "j.png", (48, 64), "RGB"),
]
CORRUPT = ("fish", "g.jpg")  # sorts between f.png and h.png, so it lands inside a shard


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """A three-class folder of 25 random images of varied sizes and formats, one corrupt file, one non-image."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for cls, name, (w, h), mode in IMAGES:
        path = root / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)
    (root / CORRUPT[0] / CORRUPT[1]).write_bytes(b"this is not a jpeg" * 20)
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def folder(image_root) -> ImageFolder:
    return ImageFolder(image_root, SIZE)


@pytest.fixture(scope="module")
def codec(tiny_vae) -> LatentCodec:
    return LatentCodec.from_pretrained(str(tiny_vae))


def expected_files() -> list[str]:
    """Relative paths in the order ImageFolder must list them: by class, then sorted path."""
    entries = [(cls, name) for cls, name, _, _ in IMAGES] + [CORRUPT]
    return [f"{cls}/{name}" for cls in ("cat", "dog", "fish") for c, name in sorted(entries) if c == cls]


def shard_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors and the metadata of a shard file (fails on a truncated file)."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def assert_same_shards(dir_a: Path, dir_b: Path, num_shards: int) -> None:
    """Both folders hold the same complete set of shards with equal tensors and metadata."""
    for d in (dir_a, dir_b):
        assert sorted(p.name for p in d.glob("shard_*.safetensors")) == \
            [shard_path(d, k).name for k in range(num_shards)]
    for k in range(num_shards):
        (ta, ma), (tb, mb) = shard_tensors(shard_path(dir_a, k)), shard_tensors(shard_path(dir_b, k))
        assert ta.keys() == tb.keys() == {"mean", "std", "labels", "index"} and ma == mb
        for name in ta:
            assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), (k, name)


def test_center_crop_arr_downsamples_and_centres():
    # 128 wide x 64 high: R = 2*column, G = 4*row. A 2x box halving gives R = 4x+1, G = 8y+2 exactly;
    # the 64x32 result is already the right scale and the centred 32x32 crop starts at column 16.
    rows, cols = np.mgrid[0:64, 0:128]
    arr = np.stack([2 * cols, 4 * rows, np.full_like(rows, 7)], axis=-1).astype(np.uint8)
    out = center_crop_arr(Image.fromarray(arr), SIZE)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    expected = np.stack([4 * (x + 16) + 1, 8 * y + 2, np.full_like(y, 7)], axis=-1)
    np.testing.assert_array_equal(out, expected)

    # Tall, small, grey and RGBA images all come out as the square RGB crop.
    for size, mode in [((33, 80), "RGB"), ((20, 30), "L"), ((300, 90), "RGBA")]:
        assert center_crop_arr(Image.new(mode, size), SIZE).shape == (SIZE, SIZE, 3)


def test_image_folder_lists_sorted_files_and_labels(folder, image_root, tmp_path):
    assert folder.classes == ["cat", "dog", "fish"]
    assert folder.files == expected_files()  # notes.txt left out; C.JPEG, .webp, .bmp and sub/ kept
    assert len(folder) == len(IMAGES) + 1
    assert folder.labels.dtype == torch.int64
    assert folder.labels.tolist() == [["cat", "dog", "fish"].index(f.split("/")[0]) for f in folder.files]

    i = folder.files.index("cat/img_9.png")
    image, label = folder[i]
    with Image.open(image_root / "cat/img_9.png") as img:
        expected = torch.from_numpy(center_crop_arr(img, SIZE).copy()).permute(2, 0, 1)
    assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE) and label == 0
    assert torch.equal(image, expected) and image.float().std() > 10  # real noise, not a blank image

    bad = folder.files.index("fish/g.jpg")
    assert folder.read(bad) is None and folder.try_read(bad)[1]
    with pytest.raises(OSError, match="g.jpg"):
        folder[bad]

    with pytest.raises(FileNotFoundError, match="data.root="):
        ImageFolder(tmp_path / "missing", SIZE)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="data.root=.*<class>/<image>"):
        ImageFolder(tmp_path / "empty", SIZE)


def test_cache_round_trip(folder, codec, image_root, tmp_path):
    out = tmp_path / "latents"
    stats = cache_latents(folder, codec, out, shard_size=8, batch_size=3, progress=False)
    assert stats["shards_total"] == stats["shards_written"] == 4 and stats["shards_existing"] == 0
    assert stats["images_encoded"] == len(IMAGES) and stats["images_unreadable"] == 1

    meta = json.loads((out / "meta.json").read_text())
    assert meta["vae"] == str(codec.name) and meta["scaling_factor"] == codec.scaling_factor
    assert meta["image_size"] == SIZE and meta["latent_shape"] == [4, 4, 4] and meta["dtype"] == "float32"
    assert meta["num_images"] == len(IMAGES) + 1 and meta["num_shards"] == 4 and meta["shard_size"] == 8
    assert meta["classes"] == ["cat", "dog", "fish"] and meta["root"] == str(image_root)
    assert (out / "files.txt").read_text().splitlines() == expected_files()

    bad = folder.files.index("fish/g.jpg")
    _, shard_meta = shard_tensors(shard_path(out, bad // 8))
    assert json.loads(shard_meta["skipped"])[0][:2] == [bad, "fish/g.jpg"]
    status = latent_cache_status(out)
    assert status["complete"] and status["images_cached"] == len(IMAGES) and status["images_unreadable"] == 1

    ds = LatentDataset(out, image_root=str(image_root))
    assert len(ds) == len(IMAGES) and ds.num_classes == 3 and ds.latent_shape == (4, 4, 4)
    assert ds.scaling_factor == codec.scaling_factor
    valid = [i for i in range(len(folder)) if i != bad]  # item j of the dataset is image valid[j]
    idx = torch.tensor([24, 0, 13, 13, 7, bad])  # unsorted, repeated, across all shards
    batch = ds[idx]
    images = torch.stack([folder.read(valid[j]) for j in idx.tolist()])
    mean, std = codec.moments(images)
    assert batch["mean"].dtype == batch["std"].dtype == torch.float32 and batch["mean"].shape == (6, 4, 4, 4)
    torch.testing.assert_close(batch["mean"], mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch["std"], std, atol=1e-5, rtol=0)
    assert not torch.allclose(batch["mean"][0], batch["mean"][1]) and (batch["std"] > 0).all()
    assert batch["labels"].tolist() == [int(folder.labels[valid[j]]) for j in idx.tolist()]
    assert batch["images"].dtype == torch.uint8 and torch.equal(batch["images"], images)

    one = ds[13]
    assert one["mean"].shape == (4, 4, 4) and torch.equal(one["mean"], batch["mean"][2])
    assert int(ds[np.int64(13)]["labels"]) == int(batch["labels"][2])
    assert "images" not in LatentDataset(out)[idx]
    with pytest.raises(IndexError, match="25"):
        ds[torch.tensor([0, 25])]

    # Handles are reopened after pickling (DataLoader workers) and in forked workers.
    again = pickle.loads(pickle.dumps(ds))[idx]
    assert all(torch.equal(again[k], batch[k]) for k in batch)
    loader = torch.utils.data.DataLoader(ds, sampler=[idx], batch_size=None, num_workers=1)
    from_worker = next(iter(loader))
    assert all(torch.equal(from_worker[k], batch[k]) for k in batch)

    # Half precision stores half the bytes and reads back as float32 close to the float32 cache.
    half = cache_latents(folder, codec, tmp_path / "half", shard_size=8, batch_size=3, dtype="float16",
                         progress=False)
    assert half["images_encoded"] == len(IMAGES)
    assert shard_tensors(shard_path(tmp_path / "half", 0))[0]["mean"].dtype == torch.float16
    half_batch = LatentDataset(tmp_path / "half")[idx]
    assert half_batch["mean"].dtype == torch.float32
    torch.testing.assert_close(half_batch["mean"], batch["mean"], atol=1e-2, rtol=1e-2)


def test_rank_split_equals_single_run_and_incomplete_cache_is_refused(folder, codec, tmp_path):
    single, split = tmp_path / "single", tmp_path / "split"
    kwargs = dict(shard_size=8, batch_size=3, progress=False)
    cache_latents(folder, codec, single, world_size=1, num_workers=2, **kwargs)

    stats = cache_latents(folder, codec, split, rank=1, world_size=2, **kwargs)
    assert stats["shards_written"] == 2 and sorted(p.name for p in split.glob("shard_*")) == \
        ["shard_00001.safetensors", "shard_00003.safetensors"]
    assert latent_cache_status(split)["missing"] == [0, 2]
    with pytest.raises(FileNotFoundError, match=r"2 of 4 shards.*stage=cache_latents"):
        LatentDataset(split)

    stats = cache_latents(folder, codec, split, rank=0, world_size=2, **kwargs)
    assert stats["shards_written"] == 2 and stats["images_unreadable"] == 1  # the corrupt file is in shard 2
    assert_same_shards(single, split, 4)
    for k in range(4):
        assert shard_path(single, k).read_bytes() == shard_path(split, k).read_bytes()

    # Rerunning a finished cache writes nothing.
    stats = cache_latents(folder, codec, split, **kwargs)
    assert stats["shards_written"] == 0 and stats["shards_existing"] == 4 and stats["images_encoded"] == 0


def test_killed_cache_resumes_to_the_uninterrupted_result(folder, codec, image_root, tiny_vae, tmp_path):
    out, reference = tmp_path / "killed", tmp_path / "reference"
    num_shards = (len(IMAGES) + 2) // 2
    # Slow each encode a little so the kill lands mid-run on any machine; the kill itself is real.
    script = (
        "import sys, time\n"
        "from ddt.data.imagenet import ImageFolder\n"
        "from ddt.data.latents import cache_latents\n"
        "from ddt.models.vae import LatentCodec\n"
        "codec = LatentCodec.from_pretrained(sys.argv[1])\n"
        "moments = codec.moments\n"
        "def slow(images):\n"
        "    time.sleep(0.1)\n"
        "    return moments(images)\n"
        "codec.moments = slow\n"
        f"cache_latents(ImageFolder(sys.argv[2], {SIZE}), codec, sys.argv[3], shard_size=2, batch_size=1, "
        "progress=False)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen([sys.executable, "-c", script, str(tiny_vae), str(image_root), str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and not list(out.glob("shard_*.safetensors")):
        time.sleep(0.01)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    assert alive, f"the caching subprocess ended before it was killed:\n{stderr.decode()[-3000:]}"

    done = sorted(out.glob("shard_*.safetensors"))
    assert 1 <= len(done) < num_shards
    for path in done:  # only complete shards: each one loads whole
        tensors, _ = shard_tensors(path)
        assert tensors["mean"].shape[1:] == (4, 4, 4) and len(tensors["index"]) == len(tensors["mean"])

    stats = cache_latents(folder, codec, out, shard_size=2, batch_size=1, progress=False)
    assert stats["shards_existing"] == len(done) and stats["shards_written"] == num_shards - len(done)
    assert not list(out.glob(".*.tmp"))  # the killed run's temp file is cleaned up
    cache_latents(folder, codec, reference, shard_size=2, batch_size=1, progress=False)
    assert_same_shards(out, reference, num_shards)
    assert len(LatentDataset(out)) == len(IMAGES)


def test_meta_mismatch_names_the_key(folder, codec, tmp_path):
    out = tmp_path / "latents"
    cache_latents(folder, codec, out, shard_size=8, batch_size=8, progress=False)
    meta = (out / "meta.json").read_bytes()
    with pytest.raises(ValueError, match=r"shard_size=8 .* shard_size=4.*data.latents_dir"):
        cache_latents(folder, codec, out, shard_size=4, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="dtype='float32'.*dtype='bfloat16'"):
        cache_latents(folder, codec, out, shard_size=8, dtype="bfloat16", progress=False)
    with pytest.raises(ValueError, match="image_size=32 .* image_size=64"):
        cache_latents(ImageFolder(folder.root, 64), codec, out, shard_size=8, progress=False)
    assert (out / "meta.json").read_bytes() == meta  # a refused run leaves the cache as it was
    with pytest.raises(FileNotFoundError, match="meta.json"):
        LatentDataset(tmp_path / "nothing")
