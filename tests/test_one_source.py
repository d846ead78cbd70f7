"""Issue 40, "each fact once": the facts the config and the code share are written in one place each."""
import shutil

import pytest

import ddt.config
from conftest import ROOT
from ddt.config import build_ddt, build_network, model_group, model_presets, validate
from ddt.errors import UsageError
from ddt.models import DDT, build_model
from ddt.schema import decoder_depth, has_encoder, head_problems, split_problem

TINY = dict(in_channels=3, patch_size=4, hidden_size=32, num_heads=2, num_classes=10)


@pytest.mark.parametrize("depth,encoder_depth", [(28, 99), (5, 5), (5, 0)])
def test_the_split_rule_is_one_function_the_config_and_the_network_call(compose, depth, encoder_depth):
    line = split_problem(depth, encoder_depth)
    with pytest.raises(UsageError) as config_err:
        validate(compose(f"model.depth={depth}", f"model.encoder_depth={encoder_depth}"))
    if encoder_depth > 0:  # encoder_depth=0 is also below the schema's bound, which names it first
        assert line in config_err.value.problems
    with pytest.raises(ValueError) as network_err:
        DDT(**TINY, depth=depth, encoder_depth=encoder_depth)
    assert str(network_err.value) == line


@pytest.mark.parametrize("depth,encoder_depth", [(28, 22), (28, 8), (5, 1)])
def test_decoder_depth_is_one_definition(compose, depth, encoder_depth):
    plain = validate(compose(f"model.depth={depth}", f"model.encoder_depth={encoder_depth}"))
    assert plain["model"]["decoder_depth"] == build_network(plain).decoder_depth == decoder_depth(depth, encoder_depth)


def test_the_sit_has_no_encoder_rule_is_one_place(compose):
    assert has_encoder("ddt") and not has_encoder("sit")
    assert build_model("ddt", **TINY, depth=3, encoder_depth=2).decoupled
    assert not build_model("sit", **TINY, depth=3).decoupled
    lines = head_problems("sit", 96, 8)
    with pytest.raises(UsageError) as config_err:
        validate(compose("baseline=improved_sit", "model.decoder_hidden_size=96", "model.decoder_num_heads=8"))
    assert config_err.value.problems == lines
    with pytest.raises(ValueError) as network_err:
        build_model("sit", **TINY, depth=3, decoder_hidden_size=96, decoder_num_heads=8)
    assert str(network_err.value) == "; ".join(lines)
    with pytest.raises(UsageError, match="reuses the condition encoder of a DDT; model.arch=sit has none"):
        validate(compose("baseline=improved_sit", "sampler.sharing=uniform", "sampler.num_recompute=4"))


R256 = ["resolution=r256", "data.root=/d"]


@pytest.mark.parametrize("name,file,overrides", [("QUICKSTART", "quickstart", []), ("S", "ddt_s", R256),
                                                 ("B", "ddt_b", R256), ("XL", "ddt_xl", R256)])
def test_the_benchmarks_sizes_are_those_conf_model_composes(compose, name, file, overrides):
    import benchmarks.run

    composed = validate(compose(f"model={file}", *overrides))["model"]
    assert getattr(benchmarks.run, name) == {k: composed[k] for k in benchmarks.run.SPEC_KEYS}


def test_a_size_changed_in_conf_model_changes_what_the_benchmarks_and_build_ddt_build(tmp_path, monkeypatch):
    from benchmarks.run import preset_spec

    shutil.copytree(ROOT / "conf" / "model", tmp_path / "model")
    small = tmp_path / "model" / "ddt_s.yaml"
    small.write_text(small.read_text().replace("hidden_size: 384", "hidden_size: 480").replace("depth: 12", "depth: 10"))
    before = preset_spec("S")
    monkeypatch.setattr(ddt.config, "CONF_DIR", tmp_path)
    assert preset_spec("S") == {**before, "hidden_size": 480, "depth": 10}
    assert (build_ddt("S").hidden_size, build_ddt("S").depth) == (480, 10)
    dh = model_group("S-DH")  # conf/model/ddt_s_dh.yaml builds on ddt_s: its encoder width follows
    assert (dh["hidden_size"], dh["depth"], dh["decoder_hidden_size"]) == (480, 14, 2048)


def test_every_preset_name_is_one_conf_model_file():
    presets = model_presets()
    assert sorted(presets.values()) == sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
    assert {"S", "B", "L", "XL", "quickstart", "S-DH", "B-DH", "L-DH", "XL-DH"} == set(presets)
    with pytest.raises(KeyError, match="unknown model preset 'XXL'"):
        model_group("XXL")
