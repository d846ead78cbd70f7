"""Issue 42, the local study: `launch.py -m +halving=on ...` runs successive halving as one command (ddt.study).

The config group's checks, then a real study of 4 splits x 2 seeds on digits at a tiny width (two rungs) and
the same grid trained to the last rung in one go, which it is compared with.
"""
import pytest

from conftest import ROOT
from ddt.config import config_id, run_subdir, validate
from ddt.errors import UsageError


@pytest.mark.parametrize("overrides, key", [
    (["halving.rungs=[20,10]"], "halving.rungs=[20,10] must be training steps, positive and increasing"),
    (["halving.rungs=[0,60]"], "halving.rungs=[0,60] must be training steps"),
    (["halving.rungs=[20.5,60]"], "halving.rungs=[20.5,60] is not a list of an integer"),
    (["halving.rungs=[20,60]", "halving.eta=1"], "halving.eta=1 is out of range: it must be >= 2"),
    (["halving.rungs=[20,60]", "halving.metric=lpips"], "halving.metric='lpips' is not one of fid, sfid, isc_mean"),
    ([], "halving.rungs is required here: pass halving.rungs=..."),
])
def test_a_bad_halving_setting_is_one_line_naming_its_key(compose, overrides, key):
    with pytest.raises(UsageError) as err:
        validate(compose("+halving=on", *overrides))
    (problem,) = err.value.problems
    assert key in problem and "\n" not in problem


def test_halving_keys_enter_neither_config_id_nor_the_run_folder(compose):
    plain = validate(compose("model.encoder_depth=4")).to_dict()
    study = validate(compose("+halving=on", "halving.rungs=[20,60]", "halving.eta=2", "model.encoder_depth=4",
                             "train.max_steps=20")).to_dict()
    assert "halving" not in plain and study["halving"] == {"rungs": [20, 60], "eta": 2, "metric": "fid"}
    assert config_id(study) == config_id(plain)
    assert run_subdir(["+halving=on", "halving.rungs=[20,60]", "model.encoder_depth=4", "seed=1",
                       "train.max_steps=20"]) == "model.encoder_depth=4,seed=1"
