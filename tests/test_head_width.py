"""A decoder head of another width than the encoder (RAE's DiT-DH): shapes, reuse of s, equal widths, checkpoints."""
import pytest
import torch

from ddt.config import build_ddt, build_network, model_group, validate
from ddt.data.pixels import ImageTensors
from ddt.errors import UsageError
from ddt.models import DDT, build_model, compile_model
from ddt.models.ddt import DDTBlock, FinalLayer, PatchEmbed
from ddt.sampling import sample
from ddt.train import Trainer, TrainConfig

TINY = dict(in_channels=3, patch_size=2, hidden_size=32, num_heads=2, depth=5, encoder_depth=3, num_classes=10)
WIDE = dict(decoder_hidden_size=48, decoder_num_heads=3)


def tiny(seed: int = 0, **widths) -> DDT:
    """A tiny DDT with a non-zero output layer, so that the velocity depends on every path."""
    torch.manual_seed(seed)
    model = DDT(**TINY, **widths)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    return model


def inputs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 3, 8, 12, generator=g), torch.rand(batch, generator=g),
            torch.randint(0, 11, (batch,), generator=g))


def test_shapes_and_the_head_runs_at_its_width():
    model = tiny(**WIDE).eval()
    x, t, y = inputs()
    with torch.no_grad():
        v, s = model(x, t, y)
    assert v.shape == x.shape and s.shape == (3, 4 * 6, 32)  # s stays at the encoder's width
    assert [b.norm1.weight.shape[0] for b in model.blocks] == [32, 32, 32, 48, 48]
    assert [b.attn.num_heads for b in model.blocks] == [2, 2, 2, 3, 3]
    assert model.x_embedder.proj.out_features == model.final_layer.linear.in_features == 48
    assert model.s_embedder.proj.out_features == model.t_embedder.mlp[2].out_features == 32
    assert (model.s_projector.in_features, model.s_projector.out_features) == (32, 48)


def test_a_reused_s_gives_the_recomputed_output():
    model = tiny(**WIDE).eval()
    x, t, y = inputs()
    with torch.no_grad():
        v, s = model(x, t, y)
        shared = model.self_condition(model.encoder_output(x, t, y), t)  # the sampler's encoder-sharing path
        v_reused, s_back = model(x, t, y, s=shared)
        v_other, _ = model(x, t, y, s=s.flip(0))
    assert torch.allclose(shared, s, atol=1e-6) and s_back is shared
    assert torch.allclose(v_reused, v, atol=1e-6)
    assert not torch.allclose(v_other, v, atol=1e-3)  # the head does read s


def test_equal_widths_are_todays_model():
    today, same = tiny(), tiny(decoder_hidden_size=32, decoder_num_heads=2)
    a, b = today.state_dict(), same.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)  # names, order, shapes, numbers
    assert (same.decoder_hidden_size, same.decoder_num_heads) == (None, None)  # the same checkpoint signature
    assert not any(k.startswith("s_projector") for k in a)
    x, t, y = inputs()
    assert torch.equal(today(x, t, y)[0], same(x, t, y)[0])
    with torch.device("meta"):
        xl = build_ddt("XL", encoder_depth=22, decoder_hidden_size=1152, decoder_num_heads=16)
    assert sum(p.numel() for p in xl.parameters()) == 674_646_352  # the official DDT-XL/2 22en6de


def test_a_wide_head_adds_exactly_its_width_and_the_projection_of_s():
    """DDT-XL's 22 encoder blocks with a 2-block 2048-wide head (16 heads) against the layers counted apart."""
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    with torch.device("meta"):
        narrow = build_ddt("XL", depth=24, encoder_depth=22)
        wide = build_ddt("XL", depth=24, encoder_depth=22, decoder_hidden_size=2048, decoder_num_heads=16)
        patch_dim = 4 * 2 * 2
        grown = [(DDTBlock(2048, 16), DDTBlock(1152, 16)), (PatchEmbed(patch_dim, 2048), PatchEmbed(patch_dim, 1152)),
                 (FinalLayer(2048, patch_dim), FinalLayer(1152, patch_dim))]
    per_block, embedder, final = (count(w) - count(n) for w, n in grown)
    assert count(wide) - count(narrow) == 2 * per_block + embedder + final + (1152 * 2048 + 2048)
    assert set(wide.state_dict()) == set(narrow.state_dict()) | {"s_projector.weight", "s_projector.bias"}


def test_activation_checkpointing_gives_the_same_gradients():
    x, t, y = inputs()
    grads = []
    for checkpointing in (False, True):
        model = tiny(**WIDE)
        model.activation_checkpointing = checkpointing
        model(x, t, y)[0].square().mean().backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])
    assert grads[0]["s_projector.weight"].abs().sum() > 0


def test_encoder_sharing_in_the_sampler():
    model = tiny(**WIDE).eval()
    noise, labels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([1, 4])
    with torch.no_grad():
        every = sample(model, noise, labels, num_steps=4, cfg_scale=2.0)
        listed = sample(model, noise, labels, num_steps=4, cfg_scale=2.0, recompute_steps=range(4))
        shared = sample(model, noise, labels, num_steps=4, cfg_scale=2.0, recompute_steps=[0, 2])
    assert torch.equal(every, listed) and shared.shape == noise.shape and torch.isfinite(shared).all()
    assert not torch.allclose(shared, every)  # the reused s is an older one


def test_checkpoint_round_trip_and_another_width_is_named(tmp_path):
    data = ImageTensors(torch.randint(0, 256, (16, 3, 8, 8), generator=torch.Generator().manual_seed(1),
                                      dtype=torch.uint8), torch.randint(0, 10, (16,)))

    def trainer(run_dir, model):
        cfg = TrainConfig(max_steps=2, batch_size=8, lr=1e-3, ema_decay=0.9, ckpt_every=2, log_every=1)
        return Trainer(model, data, cfg, run_dir=run_dir, seed=3, progress=False)

    trained = trainer(tmp_path / "a", tiny(**WIDE))
    trained.fit()
    path = tmp_path / "a" / "checkpoints" / "last.pt"
    resumed = trainer(tmp_path / "b", tiny(seed=1, **WIDE))
    resumed.load(path)
    x, t, y = inputs()
    with torch.no_grad():
        for name in ("model", "ema"):
            assert torch.equal(getattr(trained, name)(x, t, y)[0], getattr(resumed, name)(x, t, y)[0]), name
    other = trainer(tmp_path / "c", tiny(decoder_hidden_size=64, decoder_num_heads=4))
    with pytest.raises(ValueError, match="model.decoder_hidden_size: checkpoint 48, config 64"):
        other.load(path)


def test_compiled_blocks_match_eager_with_one_more_graph_for_the_head():
    from torch._dynamo.utils import counters

    model = tiny(**WIDE).eval()
    x, t, y = inputs()
    with torch.no_grad():
        eager, s = model(x, t, y)
        torch._dynamo.reset()
        counters.clear()
        compile_model(model)
        compiled, _ = model(x, t, y)
        graphs = counters["stats"]["unique_graphs"]
        again, _ = model(x, t, y)
        reused, _ = model(x, t, y, s=s)
        compile_model(model, enabled=False)
    assert (compiled - eager).abs().max() < 1e-5 and (reused - eager).abs().max() < 1e-5
    assert torch.equal(compiled, again)
    # today's model compiles 2 graphs (encoder blocks, decoder blocks); the head's width adds one, once
    assert graphs <= 3 and counters["stats"]["unique_graphs"] == graphs


def test_the_config_keys_build_the_head(compose):
    plain = validate(compose("model.decoder_hidden_size=96", "model.decoder_num_heads=8"))
    model = build_network(plain)
    assert model.decoder_size == (96, 8) and model.x_embedder.proj.out_features == 96
    plain = validate(compose())
    assert (plain["model"]["decoder_hidden_size"], plain["model"]["decoder_num_heads"]) == (None, None)
    assert build_network(plain).decoder_size == (64, 4)
    dh = validate(compose("model=ddt_xl_dh", "resolution=r256", "data.root=/d"))
    m = dh["model"]
    assert (m["depth"], m["encoder_depth"], m["decoder_depth"], m["hidden_size"]) == (30, 28, 2, 1152)
    head = model_group("XL-DH")
    assert (m["decoder_hidden_size"], m["decoder_num_heads"]) == (2048, 16)
    assert all(m[k] == head[k] for k in ("depth", "encoder_depth", "decoder_depth", "decoder_hidden_size"))
    with torch.device("meta"):
        from_config, from_preset = build_network(dh), build_ddt("XL-DH")
    assert {k: v.shape for k, v in from_config.state_dict().items()} == {
        k: v.shape for k, v in from_preset.state_dict().items()}
    point = validate(compose("+experiment=head_width", "model.decoder_hidden_size=2048", "model.decoder_depth=4",
                             "data.root=/d"))["model"]
    assert (point["encoder_depth"], point["depth"], point["decoder_depth"]) == (22, 26, 4)  # depth follows the head


@pytest.mark.parametrize("overrides,named", [
    (["model.decoder_hidden_size=100"], "model.decoder_hidden_size=100 / model.decoder_num_heads=4"),
    (["model.decoder_num_heads=0"], "model.decoder_num_heads=0 is out of range"),
    (["baseline=improved_sit", "model.decoder_hidden_size=96"], "model.decoder_hidden_size=96 sizes a DDT's decoder"),
    (["repa=on", "model.decoder_hidden_size=96", "model.encoder_depth=4"],
     "repa.align_layer=8 is a block of the decoder"),
])
def test_a_bad_value_is_one_line_naming_the_key(compose, overrides, named):
    with pytest.raises(UsageError) as err:
        validate(compose(*overrides))
    assert len(err.value.problems) == 1 and named in err.value.problems[0] and "\n" not in err.value.problems[0]


def test_sit_has_no_decoder_to_size():
    with pytest.raises(ValueError, match="model.arch=sit has none"):
        build_model("sit", **{**TINY, **WIDE})
    assert build_model("sit", **TINY, decoder_hidden_size=None).decoder_size == (32, 2)


def test_the_presets_table_in_the_docs_is_the_real_class():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text()
    rows = re.findall(r"^\| ([SBLX]+-DH) \| .*? \| .*? \| ([\d.]+) M \|", text, flags=re.M)
    assert [name for name, _ in rows] == ["S-DH", "B-DH", "L-DH", "XL-DH"]
    for name, millions in rows:
        with torch.device("meta"):
            count = sum(p.numel() for p in build_ddt(name).parameters())
        assert round(count / 1e6, 1) == float(millions), name
