"""A checkpoint written by an earlier main (tests/fixtures/main_9983e1e) loads and resumes under today's code."""
import json
import shutil

import torch

from conftest import ROOT, launch
from ddt import checkpoint
from ddt.models import build_model

FIXTURE = ROOT / "tests" / "fixtures" / "main_9983e1e"
RUN = ["model.depth=2", "model.encoder_depth=1", "model.hidden_size=16", "model.num_heads=2", "train.ckpt_every=2",
       "train.batch_size=16", "stage=train", "progress=false"]


def test_a_checkpoint_of_9983e1e_fits_the_model_its_signature_describes():
    state = checkpoint.load(FIXTURE / "step4.pt")
    assert "prediction" not in state["signature"]  # written before later keys existed: they take their defaults
    model = build_model(**state["signature"])
    assert model.config_mismatch(state["signature"]) == []
    assert model.config_mismatch({**state["signature"], "hidden_size": 32}) == ["model.hidden_size: checkpoint 32, config 16"]


def test_a_checkpoint_of_9983e1e_resumes_to_the_weights_9983e1e_reached(tmp_path):
    """Resumed from its step 4 to step 6, the run ends with the weights 9983e1e's own resume reached (bit-equal on
    the CPU that made the fixture; float round-off apart on another CPU kind)."""
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(FIXTURE / "step4.pt", tmp_path / "checkpoints" / "last.pt")
    launch(*RUN, "train.max_steps=6", f"hydra.run.dir={tmp_path}")
    resumed, expected = checkpoint.load(tmp_path / "checkpoints" / "last.pt"), checkpoint.load(FIXTURE / "step6_weights.pt")
    assert resumed["step"] == expected["step"] == 6
    for part in ("model", "ema"):
        for name, tensor in expected[part].items():
            torch.testing.assert_close(resumed[part][name], tensor, rtol=1e-5, atol=1e-7, msg=f"{part}.{name}")


def test_runs_of_9983e1e_keep_their_config_id(compose):
    """config_ids computed by 9983e1e itself (fixture): the typed config hashes the keys the YAML gave, as before."""
    from ddt.config import config_id, validate

    for point in json.loads((FIXTURE / "config_ids.json").read_text()):
        assert config_id(validate(compose(*point["overrides"]))) == point["config_id"], point["overrides"]


def test_a_quickstart_completed_by_9983e1e_is_not_redone(compose):
    from ddt.config import stages, validate
    from ddt.runner import is_completed

    old = json.loads((FIXTURE / "quickstart_results.json").read_text())
    assert old["config"]["cache_dir"] == ".cache/ddt"  # the default where the fixture was made
    assert is_completed(old, validate(compose("cache_dir=.cache/ddt")), stages(compose()))
    assert not is_completed(old, validate(compose("cache_dir=.cache/ddt", "prediction=x")), stages(compose()))
