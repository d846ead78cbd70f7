"""The real quickstart, exactly as `python launch.py` runs it, against the untrained model (slow)."""
import json

import pytest

from conftest import launch


@pytest.mark.slow
def test_quickstart_beats_the_untrained_model(tmp_path, cache_dir):
    launch("progress=false", f"hydra.run.dir={tmp_path / 'trained'}")
    launch("progress=false", "train.max_steps=0", f"hydra.run.dir={tmp_path / 'untrained'}")
    trained = json.loads((tmp_path / "trained" / "results.json").read_text())
    untrained = json.loads((tmp_path / "untrained" / "results.json").read_text())
    assert trained["status"] == untrained["status"] == "completed"
    assert trained["train"]["step"] == trained["config"]["train"]["max_steps"]
    assert trained["metrics"]["fid"] < 0.25 * untrained["metrics"]["fid"]
    assert trained["metrics"]["isc_mean"] > untrained["metrics"]["isc_mean"]
    assert trained["metrics"]["precision"] > untrained["metrics"]["precision"]
