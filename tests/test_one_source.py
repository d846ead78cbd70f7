"""Issue 40, "each fact once": the facts the config and the code share are written in one place each."""
import pytest

from ddt.config import build_network, validate
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
