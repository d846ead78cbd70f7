"""Table 2 baselines: Improved-SiT (one undivided stack) and the naive DDT† block options, as config."""
import itertools

import pytest
import torch

from ddt.components import build_objective
from ddt.config import build_ddt, build_network, validate
from ddt.data.digits import load_digits
from ddt.data.pixels import ImageTensors
from ddt.models import DDT, SiT, build_model
from ddt.sampling import sample
from ddt.train import Trainer, TrainConfig
from tiny import TINY_DINOV2

TINY = ["model.depth=4", "model.encoder_depth=2", "model.hidden_size=32", "model.num_heads=2",
        "model.repa_align_layer=2"]
SWITCHES = {"model.arch": ["ddt", "sit"], "model.norm": ["rmsnorm", "layernorm"], "model.ffn": ["swiglu", "mlp"],
            "model.pos": ["rope", "sincos"], "model.qk_norm": ["true", "false"],
            "train.time_distribution": ["lognorm", "uniform"], "repa": ["off", "on"]}


@pytest.fixture(scope="module")
def digits():
    images, labels = load_digits(16)
    return ImageTensors(images[:64], labels[:64])


def test_every_combination_composes_trains_one_step_and_samples(compose, digits, tiny_dinov2, tmp_path):
    combos = list(itertools.product(*SWITCHES.values()))
    assert len(combos) == 128
    for i, values in enumerate(combos):
        overrides = [f"{k}={v}" for k, v in zip(SWITCHES, values)]
        repa = ["repa.target_encoder=vit_small_patch14_dinov2", f"repa.target_weights={tiny_dinov2}",
                "repa.target_kwargs={" + ",".join(f"{k}:{v}" for k, v in TINY_DINOV2.items()) + "}",
                "repa.projector_dim=16"] if "repa=on" in overrides else []
        plain = validate(compose(*overrides[-1:], *overrides[:-1], *TINY, *repa))
        torch.manual_seed(0)
        model = build_network(plain)
        assert isinstance(model, SiT if plain["model"]["arch"] == "sit" else DDT), overrides
        cfg = TrainConfig(**{**plain["train"], "max_steps": 1, "batch_size": 4})
        trainer = Trainer(model, digits, cfg, run_dir=tmp_path / str(i), seed=0, progress=False,
                          objective=build_objective(plain, None, None))
        stats = trainer.fit()
        assert stats["step"] == 1 and torch.isfinite(torch.tensor(stats["final_loss"])), overrides
        assert ("final_repa_loss" in stats) == (plain["repa"]["enabled"]), overrides
        x = sample(model.eval(), torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), num_steps=2, cfg_scale=2.0)
        assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all(), overrides


def test_sit_is_one_stack_without_a_self_condition():
    torch.manual_seed(0)
    sit = SiT(in_channels=3, patch_size=4, hidden_size=32, num_heads=2, depth=3, num_classes=10)
    assert not hasattr(sit, "s_embedder") and not hasattr(sit, "encoder_output") and not sit.decoupled
    torch.nn.init.normal_(sit.final_layer.linear.weight, std=0.1)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 10])
    v, s = sit(x, t, y)
    assert v.shape == x.shape and s is None
    with pytest.raises(ValueError, match="no self-condition"):
        sit(x, t, y, s=torch.zeros(2, 16, 32))
    with pytest.raises(ValueError, match="encoder sharing needs a decoupled model"):
        sample(sit.eval(), x, y, num_steps=4, recompute_steps=[0, 2])


def test_parameter_counts_match_dit_and_sit_sizes():
    with torch.device("meta"):
        ddt = build_ddt("XL")
        sit = build_ddt("XL", arch="sit")
        naive_sit = build_ddt("XL", arch="sit", norm="layernorm", ffn="mlp", pos="sincos", qk_norm=False)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ddt) == 674_646_352
    assert count(sit) == count(ddt) - (2 * 2 * 4 * 1152 + 1152)  # no s_embedder, all else shared
    # DiT-XL/2 / SiT-XL/2 (675,129,632) = the naive SiT + qkv biases + its learned-sigma output half
    # + its fixed sin-cos table (stored as a frozen parameter there, computed here).
    assert count(naive_sit) + 28 * 3 * 1152 + (1152 * 16 + 16) + 256 * 1152 == 675_129_632


@pytest.mark.parametrize("switch,value,module", [("norm", "layernorm", "norm"), ("ffn", "mlp", "mlp"),
                                                 ("qk_norm", False, "attn.")])
def test_each_naive_switch_changes_only_the_module_it_names(switch, value, module):
    kwargs = dict(in_channels=3, patch_size=4, hidden_size=32, num_heads=2, depth=3, encoder_depth=2, num_classes=10)
    default = DDT(**kwargs).state_dict()
    changed = DDT(**kwargs, **{switch: value}).state_dict()
    differing = {k for k in set(default) ^ set(changed)}
    differing |= {k for k in set(default) & set(changed) if default[k].shape != changed[k].shape}
    assert differing and all(f".{module}" in k or k.split(".")[2].startswith(module) for k in differing), differing


def test_sincos_positions_replace_rope_and_keep_every_parameter():
    kwargs = dict(in_channels=3, patch_size=4, hidden_size=32, num_heads=2, depth=3, encoder_depth=2, num_classes=10)
    torch.manual_seed(0)
    rope = DDT(**kwargs)
    torch.manual_seed(0)
    sincos = DDT(**kwargs, pos="sincos")
    assert {k: v.shape for k, v in rope.state_dict().items()} == {k: v.shape for k, v in sincos.state_dict().items()}
    table = sincos.positions(4, 4, torch.device("cpu"))
    assert table.shape == (16, 32) and table[0, :8].abs().sum() == 0  # sin(0) = 0 on the first axis
    torch.nn.init.normal_(rope.final_layer.linear.weight, std=0.1)
    sincos.load_state_dict(rope.state_dict())
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 2])
    assert not torch.allclose(rope(x, t, y)[0], sincos(x, t, y)[0])


@pytest.mark.parametrize("size", ["b", "l", "xl"])
def test_table2_experiments_compose_every_baseline(compose, size):
    for baseline in ("improved_sit", "improved_repa", "ddt", "ddt_repa", "naive_ddt"):
        plain = validate(compose(f"+experiment=table2_{size}", f"baseline={baseline}", "data.root=/datasets/imagenet"))
        m = plain["model"]
        assert plain["name"] == f"table2_{size}" and plain["data"]["name"] == "imagenet_latents"
        assert m["arch"] == ("sit" if "sit" in baseline or baseline == "improved_repa" else "ddt")
        assert plain["repa"]["enabled"] == (baseline in ("improved_repa", "ddt_repa", "naive_ddt"))
        assert (m["norm"], m["ffn"], m["pos"]) == (("layernorm", "mlp", "sincos") if baseline == "naive_ddt"
                                                   else ("rmsnorm", "swiglu", "rope"))
        assert plain["sampler"]["cfg_scale"] == 1.0 and plain["train"]["max_steps"] == 400_000
        assert plain["paper"]["ddt_repa"]["fid"] in (16.32, 7.98, 6.62)


def test_sharing_on_a_sit_is_a_clear_config_error(compose):
    with pytest.raises(ValueError, match="sampler.sharing=uniform reuses the condition encoder.*model.arch=sit"):
        validate(compose("baseline=improved_sit", "sampler.sharing=uniform", "sampler.num_recompute=4"))
