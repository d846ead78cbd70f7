"""The scorer `python -m ddt.evaluate SAMPLES.npz REF.npz` on a fresh clone (issue 41, item 8): the
weights download makes its cache folder, and every refusal is one line in the command's own syntax,
the batches checked before the weights."""
import re

import numpy as np
import pytest
import torch

from ddt import evaluate, extractors


def batch(path, images=4, size=32):
    np.savez(path, arr_0=np.zeros((images, size, size, 3), np.uint8))
    return path


def refusal(capsys, *argv) -> str:
    """The one error line of a refused scoring (exit 2, nothing on stdout)."""
    assert evaluate.main([str(a) for a in argv]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_the_weights_download_makes_the_missing_cache_folder(tmp_path, monkeypatch):
    served = tmp_path / "served" / "weights-inception.pth"
    served.parent.mkdir()
    torch.save({"w": torch.zeros(2)}, served)
    monkeypatch.setattr(extractors, "INCEPTION_URL", served.as_uri())  # torch.hub's own download, from a file
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    scored = {key: 0.0 for _, key in evaluate.ADM_LINES}
    monkeypatch.setattr(evaluate, "score_batches", lambda *args: scored)  # the download is what is tested
    samples, reference = batch(tmp_path / "samples.npz"), batch(tmp_path / "reference.npz")
    cache = tmp_path / "fresh" / ".cache" / "ddt"
    assert evaluate.main([str(samples), str(reference), "--cache-dir", str(cache)]) == 0
    assert (cache / served.name).read_bytes() == served.read_bytes()


@pytest.mark.parametrize("given", [None, "nowhere.pth"])
def test_the_weights_advice_uses_the_commands_flag(tmp_path, capsys, offline, given):
    samples, reference = batch(tmp_path / "samples.npz"), batch(tmp_path / "reference.npz")
    flag = ["--inception-weights", str(tmp_path / given)] if given else []
    line = refusal(capsys, samples, reference, "--cache-dir", tmp_path / "cache", *flag)
    assert "--inception-weights=" in line and "eval." not in line


@pytest.mark.parametrize("reference_holds", ["images", "statistics"])
def test_a_size_mismatch_is_reported_before_the_weights(tmp_path, capsys, offline, reference_holds):
    samples, reference = batch(tmp_path / "samples.npz"), tmp_path / "reference.npz"
    if reference_holds == "images":
        batch(reference, size=64)
        expected = "holds 32×32 images but reference batch .* holds 64×64 ones"
    else:  # digits-classifier statistics where Inception's are expected
        np.savez(reference, arr_0=np.zeros((4, 32, 32, 3), np.uint8), mu=np.zeros(64), sigma=np.eye(64))
        expected = r"mu/sigma have shapes \(64,\)/\(64, 64\) where Inception's fid features are 2048-d"
    line = refusal(capsys, samples, reference, "--cache-dir", tmp_path / "cache")  # no weights anywhere
    assert re.search(expected, line) and "weights" not in line, line


def test_a_batch_without_images_is_said_to_hold_none(tmp_path, capsys, offline):
    samples, reference = batch(tmp_path / "samples.npz", images=0), batch(tmp_path / "reference.npz")
    line = refusal(capsys, samples, reference, "--cache-dir", tmp_path / "cache")
    assert f"sample batch {samples} holds no images" in line and "must be" not in line


def test_a_text_file_named_npz_is_said_not_to_be_one(tmp_path, capsys, offline):
    samples, reference = tmp_path / "samples.npz", batch(tmp_path / "reference.npz")
    samples.write_text("0 0 0\n")
    line = refusal(capsys, samples, reference, "--cache-dir", tmp_path / "cache")
    assert f"sample batch {samples} is not an npz (zip) file" in line and "pickle" not in line
