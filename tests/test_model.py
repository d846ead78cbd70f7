"""The DDT network against the official implementation's recorded outputs and parameter counts."""
import pytest
import torch

from conftest import REFERENCE
from ddt.checkpoint import official_denoiser_state_dict
from ddt.config import build_ddt, model_group
from ddt.models import DDT


@pytest.fixture(scope="module")
def official():
    return torch.load(REFERENCE / "ddt_official_tiny.pt", weights_only=True)


def test_matches_official_forward_and_encoder_reuse(official):
    model = DDT.from_official(official["config"], official["state_dict"]).eval()
    with torch.no_grad():
        v, s = model(official["x"], official["t"], official["y"])
        v_reuse, s_reuse = model(official["x2"], official["t2"], official["y"], s=official["s"])
    assert (v - official["out"]).abs().max() < 1e-5
    assert (s - official["s"]).abs().max() < 1e-5
    assert (v_reuse - official["out_reuse"]).abs().max() < 1e-5
    assert s_reuse is official["s"]  # the decoder-only call hands back the reused s


def test_from_official_accepts_lightning_prefixes_and_prefers_ema(official):
    sd = official["state_dict"]
    noisy = {k: v + 1.0 for k, v in sd.items()}
    lightning = {"state_dict": {**{f"denoiser.{k}": v for k, v in noisy.items()},
                                **{f"ema_denoiser.{k}": v for k, v in sd.items()},
                                "diffusion_trainer.proj.0.weight": torch.zeros(1)}}
    model = DDT.from_official(official["config"], lightning).eval()
    with torch.no_grad():
        v, _ = model(official["x"], official["t"], official["y"])
    assert (v - official["out"]).abs().max() < 1e-5
    raw = official_denoiser_state_dict(lightning, prefer_ema=False)
    assert torch.equal(raw["x_embedder.proj.bias"], noisy["x_embedder.proj.bias"])


def test_official_xl_key_layout():
    lines = [l.split() for l in (REFERENCE / "ddt_official_xl_22en6de_keys.txt").read_text().splitlines()
             if l and not l.startswith("#")]
    official = {name: tuple(int(d) for d in " ".join(shape).strip("()").split(",") if d.strip())
                for name, *shape in lines}
    with torch.device("meta"):
        model = build_ddt("XL", encoder_depth=22)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official


def test_xl_state_dict_converts_to_and_from_the_released_lightning_layout():
    from ddt.checkpoint import official_projector_state_dict, to_official_lightning

    lines = [l.split()[0] for l in (REFERENCE / "ddt_official_xl_22en6de_keys.txt").read_text().splitlines()
             if l and not l.startswith("#")]
    with torch.device("meta"):
        model = build_ddt("XL", encoder_depth=22)
        projector = torch.nn.Sequential(torch.nn.Linear(1152, 2048), torch.nn.SiLU(), torch.nn.Linear(2048, 2048),
                                        torch.nn.SiLU(), torch.nn.Linear(2048, 768))
    ours = model.state_dict()
    released = to_official_lightning(ours, ours, projector.state_dict(), step=400_000)
    keys = set(released["state_dict"])
    assert {k for k in keys if k.startswith("denoiser.")} == {f"denoiser.{k}" for k in lines}
    assert {k for k in keys if k.startswith("ema_denoiser.")} == {f"ema_denoiser.{k}" for k in lines}
    assert {k for k in keys if k.startswith("diffusion_trainer.")} == {
        f"diffusion_trainer.proj.0.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    back = official_denoiser_state_dict(released)
    assert set(back) == set(ours) and all(back[k].shape == ours[k].shape for k in ours)
    assert set(official_projector_state_dict(released)) == set(projector.state_dict())


@pytest.mark.parametrize("preset,count", [("XL", 674_646_352), ("L", 457_648_144),
                                          ("B", 130_262_800), ("S", 32_839_312)])
def test_preset_parameter_counts(preset, count):
    with torch.device("meta"):
        model = build_ddt(preset)
    assert sum(p.numel() for p in model.parameters()) == count


def test_shapes_and_encoder_split():
    torch.manual_seed(0)
    model = DDT(in_channels=3, patch_size=4, hidden_size=32, num_heads=2, depth=5, encoder_depth=3,
                num_classes=10).eval()
    x, t, y = torch.randn(2, 3, 16, 12), torch.rand(2), torch.tensor([1, 10])
    # Non-zero output layer so that the velocity depends on the input.
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    with torch.no_grad():
        v, s = model(x, t, y)
        v_again, _ = model(x, t, y, s=s)
        v_other_s, _ = model(x, t, y, s=s.flip(0))
    assert v.shape == x.shape and s.shape == (2, (16 // 4) * (12 // 4), 32)
    assert torch.allclose(v, v_again, atol=1e-6)
    assert not torch.allclose(v, v_other_s)
    assert model.decoder_depth == 2 and model_group("quickstart")["depth"] == 28


@pytest.mark.parametrize("encoder_depth", [0, 5, 7])
def test_impossible_split_is_refused(encoder_depth):
    with pytest.raises(ValueError, match=f"encoder_depth={encoder_depth}"):
        DDT(in_channels=3, patch_size=2, hidden_size=32, num_heads=2, depth=5,
            encoder_depth=encoder_depth, num_classes=10)


def test_rope_real_form_under_compile_equals_the_complex_form():
    from ddt.models.ddt import apply_rope, rope_2d, rope_tables

    rope = rope_tables(rope_2d(16, 4, 4), torch.float32)
    x = torch.randn(2, 16, 3, 16)
    eager = apply_rope(x, rope)  # complex multiply
    compiled = torch.compile(apply_rope, fullgraph=True)(x, rope)  # real arithmetic on cos/sin tables
    assert (eager - compiled).abs().max() < 1e-6
    assert not torch.allclose(eager, x)


def test_patchify_round_trip_matches_unfold_order():
    model = build_ddt("quickstart", in_channels=3, patch_size=4, num_classes=10)
    x = torch.randn(2, 3, 16, 8)
    patches = model._patches(x)
    assert torch.equal(patches, torch.nn.functional.unfold(x, 4, stride=4).transpose(1, 2))
    assert torch.equal(model._unpatchify(patches, x.shape[2:]), x)


def _attention_grads(fn, q, k, v, grad_out, autocast):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # strided, as Attention passes them
    out.float().backward(grad_out)
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("shape", [(8, 64, 4, 16), (2, 64, 2, 64)])  # (B, N, H, head_dim)
def test_cpu_bf16_attention_forward_is_sdpa_and_its_float32_backward_is_as_close_to_fp32(shape):
    """Under CPU bf16 autocast the output is SDPA's bf16 output bit for bit; the gradients (backward in
    float32) are at least as close to the fp32 gradients as SDPA's bf16 backward, and come back as bf16."""
    import torch.nn.functional as F

    from ddt.models.ddt import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    grad_out = torch.randn(shape[0], shape[2], shape[1], shape[3], generator=g)
    ours = _attention_grads(attention, q, k, v, grad_out, autocast=True)
    sdpa = _attention_grads(F.scaled_dot_product_attention, q, k, v, grad_out, autocast=True)
    fp32 = _attention_grads(F.scaled_dot_product_attention, q, k, v, grad_out, autocast=False)
    assert ours[0].dtype == torch.bfloat16 and torch.equal(ours[0], sdpa[0])
    for mine, theirs, exact in zip(ours[1:], sdpa[1:], fp32[1:]):
        err, err_sdpa = (mine - exact).abs().max().item(), (theirs - exact).abs().max().item()
        assert err <= 1.05 * err_sdpa and err < 0.05, (err, err_sdpa)
    fp32_ours = _attention_grads(attention, q, k, v, grad_out, autocast=False)  # fp32: SDPA itself
    assert all(torch.equal(a, b) for a, b in zip(fp32_ours, fp32))


def test_compiled_blocks_train_in_cpu_bf16_like_eager_without_recompiles():
    """compile_model under CPU bf16 autocast (the float32-backward attention inside the block graphs):
    the same loss and gradients as eager to bf16 round-off, and a second step compiles nothing new."""
    from torch._dynamo.utils import counters

    from ddt.models import compile_model

    torch.manual_seed(0)
    eager = DDT(in_channels=3, patch_size=2, hidden_size=32, num_heads=2, depth=3, encoder_depth=2, num_classes=10)
    torch.nn.init.normal_(eager.final_layer.linear.weight, std=0.02)
    compiled = compile_model(DDT(in_channels=3, patch_size=2, hidden_size=32, num_heads=2, depth=3, encoder_depth=2,
                                 num_classes=10))
    compiled.load_state_dict(eager.state_dict())
    x, t, y = torch.randn(4, 3, 8, 8), torch.rand(4), torch.randint(0, 10, (4,))

    def step(model):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, t, y)[0].float().square().mean()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = step(eager)
    loss_c, grads_c = step(compiled)
    graphs = counters["stats"]["unique_graphs"]
    assert step(compiled)[0] == loss_c and counters["stats"]["unique_graphs"] == graphs
    assert abs(loss - loss_c) < 1e-2 * abs(loss)
    scale = max(g.abs().max().item() for g in grads.values())
    assert all((grads[n] - grads_c[n]).abs().max().item() < 0.05 * scale for n in grads)
