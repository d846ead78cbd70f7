"""Every study in experiments/ composes at every point of its sweep; cluster configs pick the launcher."""
import itertools
from pathlib import Path

import pytest
import yaml
from hydra import compose as hydra_compose, initialize_config_dir

from ddt.config import validate

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))
PAPER_STUDIES = {"encoder_ratio_b", "encoder_ratio_l", "repa", "sharing", "xl_256", "xl_512", "quickstart_ratio"}
NEEDS = {"ckpt": "ckpt=/weights/model.ckpt"}  # values a study leaves to the command line


def sweep_points(study: str) -> list[list[str]]:
    """The overrides of each point of the study's hydra.sweeper.params (cartesian product)."""
    params = yaml.safe_load((ROOT / "experiments" / f"{study}.yaml").read_text())
    params = ((params.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    axes = [[f"{key}={v.strip()}" for v in str(values).split(",")] for key, values in params.items()]
    return [list(point) for point in itertools.product(*axes)]


def test_the_paper_studies_exist():
    assert PAPER_STUDIES <= set(STUDIES)


@pytest.mark.parametrize("study", STUDIES)
def test_study_composes_at_every_sweep_point(compose, study):
    text = (ROOT / "experiments" / f"{study}.yaml").read_text()
    header = text.split("\n# @package")[0] + "\n".join(l for l in text.splitlines() if l.startswith("#"))
    assert text.startswith("# @package _global_") and "Compute:" in header, study
    assert f"python launch.py -m +experiment={study}" in header, study
    points = sweep_points(study)
    assert points, f"{study} declares no sweep in hydra.sweeper.params"
    for point in points:
        extra = [NEEDS["ckpt"]] if "ddt.required:ckpt" in text else []
        if "quickstart" not in study:  # the ImageNet studies need the dataset's location
            extra.append("data.root=/datasets/imagenet/train")
        cfg = compose(f"+experiment={study}", *point, *extra)
        plain = validate(cfg)
        assert plain["name"] == study and plain["tags"], study
        for override in point:  # the point's value reached the config
            key, value = override.split("=")
            node = plain
            for part in key.split(".")[:-1]:
                node = node[part]
            if key == "few_step_solver":  # a group choice setting solver and order together
                solver, order = (value[:-1], int(value[-1])) if value.startswith("adams") else (value, None)
                assert (plain["sampler"]["solver"], plain["sampler"]["order"]) == (solver, order), (study, override)
                continue
            if key in ("repa", "baseline"):
                continue  # group choices: checked below
            assert str(node[key.split(".")[-1]]) == value, (study, override)


def test_studies_set_what_the_paper_used(compose):
    b = [validate(compose("+experiment=encoder_ratio_b", p[0], "data.root=/d")) for p in sweep_points("encoder_ratio_b")]
    assert [c["model"]["encoder_depth"] for c in b] == [4, 6, 8, 10]
    assert all(c["model"]["depth"] == 12 and c["repa"]["enabled"] and c["resolution"]["image_size"] == 256 for c in b)
    # the paper's curve protocol: FID-50K (no CFG) at 100K, 200K, 300K and the final 400K step
    assert all(c["eval"]["every_steps"] == 100_000 and c["eval"]["curve_num_samples"] == c["eval"]["num_samples"]
               == 50_000 and c["train"]["max_steps"] == 400_000 and c["sampler"]["cfg_scale"] == 1.0 for c in b)
    l = validate(compose("+experiment=encoder_ratio_l", "model.encoder_depth=16", "data.root=/d"))
    assert l["model"]["depth"] == 24 and l["model"]["decoder_depth"] == 8 and l["repa"]["align_layer"] == 8
    on, off = (validate(compose("+experiment=repa", f"repa={v}", "data.root=/d")) for v in ("on", "off"))
    assert on["repa"]["enabled"] and not off["repa"].get("enabled", False)
    q = [validate(compose("+experiment=quickstart_ratio", p[0])) for p in sweep_points("quickstart_ratio")]
    assert [c["model"]["encoder_depth"] for c in q] == [4, 8, 12, 16, 20, 22, 24]
    assert all(c["model"]["depth"] == 28 and c["data"]["name"] == "digits" for c in q)
    assert all(c["eval"]["every_steps"] == 100 and c["train"]["max_steps"] == 500 for c in q)
    assert l["eval"]["every_steps"] == 100_000 and l["eval"]["curve_num_samples"] == 50_000
    s = validate(compose("+experiment=sharing", "sampler.sharing=dp", "sampler.num_recompute=50", NEEDS["ckpt"]))
    assert s["stage"] == ["sample", "evaluate"] and s["sampler"]["cfg_scale"] == 2.0 and s["model"]["depth"] == 28
    x512 = validate(compose("+experiment=xl_512", NEEDS["ckpt"], "data.root=/d"))
    assert x512["resolution"]["image_size"] == 512 and x512["sampler"]["cfg_scale"] == 3.0
    with pytest.raises(Exception, match="ckpt"):
        validate(compose("+experiment=sharing", "sampler.num_recompute=50"))  # weights to sample from are required


@pytest.mark.parametrize("cluster,launcher", [("localhost", "SlurmLauncher"), ("example", "SlurmLauncher"),
                                              ("local", "LocalLauncher")])
def test_cluster_configs_select_the_submitit_launcher(cluster, launcher):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = hydra_compose("config", overrides=[f"+cluster={cluster}", "model.encoder_depth=8"],
                            return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(launcher)
    assert "/.submitit/" in cfg.hydra.launcher.submitit_folder and cfg.hydra.launcher.submitit_folder.endswith("/%j")
    assert cfg.model.encoder_depth == 8  # cluster settings never touch the model
