"""Solvers, guidance interval and encoder sharing, against stubs with known answers and the official loop."""
import itertools
import math

import pytest
import torch

from ddt.models import DDT
from ddt.sampling import (SamplingStats, cosine_similarity_matrix, dp_recompute_steps, sample, schedule_cost,
                          time_grid, uniform_recompute_steps)


def test_time_grid_matches_official_schedule():
    assert torch.allclose(time_grid(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    assert torch.allclose(time_grid(3, last_step=0.1), torch.tensor([0.0, 0.45, 0.9, 1.0]))
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    assert torch.allclose(time_grid(4, timeshift=3.0), t / (t + (1 - t) * 3.0))
    assert torch.allclose(time_grid(1), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="num_steps"):
        time_grid(0)


class Recorder(torch.nn.Module):
    """v = 1 for real labels, 0 for the null label; records every decoder and encoder call."""

    num_classes = 10
    decoupled = True

    def __init__(self):
        super().__init__()
        self.calls, self.encoder_calls = [], []

    def encoder_output(self, x, t, y):
        self.encoder_calls.append({"t": t[0].item(), "labels": y.tolist()})
        return torch.zeros(len(x), 1, 1)

    def self_condition(self, h, t):
        return h + t.view(-1, 1, 1)

    def forward(self, x, t, y, s=None):
        self.calls.append({"t": t[0].item(), "labels": y.tolist(), "s": s.flatten().tolist()})
        return (y != self.num_classes).float().view(-1, 1, 1, 1).expand_as(x), s


def test_cfg_only_inside_the_open_interval():
    net = Recorder()
    x = sample(net, torch.zeros(2, 1, 2, 2), torch.tensor([3, 4]), num_steps=4, cfg_scale=3.0,
               cfg_interval=(0.25, 0.8))
    guided = [10 in c["labels"] for c in net.calls]
    assert guided == [False, False, True, True]  # times 0, .25, .5, .75: the bounds are excluded
    # v = 1 outside the interval, 0 + 3·(1 − 0) = 3 inside; each step is 0.25 long.
    assert torch.allclose(x, torch.full_like(x, 0.25 * (1 + 1 + 3 + 3)))


def test_no_unconditional_pass_without_guidance():
    net = Recorder()
    stats = SamplingStats()
    sample(net, torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), num_steps=3, stats=stats)
    assert all(10 not in c["labels"] for c in net.calls + net.encoder_calls)
    assert (stats.encoder_passes, stats.decoder_passes) == (2 * 3, 2 * 3)  # rows: 2 images


@pytest.mark.parametrize("solver,evals_per_step,encoder_passes", [("euler", 1, 3), ("heun", 2, 8), ("sde", 1, 3)])
def test_pass_counts_follow_the_schedule(solver, evals_per_step, encoder_passes):
    net, stats = Recorder(), SamplingStats()
    sample(net, torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), num_steps=6, solver=solver,
           recompute_steps=[0, 3], cfg_scale=2.0, cfg_interval=(0.4, 1.0), stats=stats)
    evals = 6 * evals_per_step - (evals_per_step - 1)  # Heun's last step is a plain Euler step
    guided = sum(10 in c["labels"] for c in net.calls)
    assert guided == (3 if solver != "heun" else 6)  # times above 0.4: 1/2, 2/3, 5/6 (Heun: twice)
    assert stats.decoder_passes == 2 * (evals + guided)  # rows: 2 images
    # The encoder runs at every evaluation of steps 0 and 3. Euler: at step 0 only for the
    # conditional half (no guided evaluation before step 3), at step 3 for both halves. Heun: step
    # 2's second evaluation (t = 1/2) is guided, so step 0 encodes both halves too.
    assert stats.encoder_passes == 2 * encoder_passes
    assert [c["t"] for c in net.encoder_calls][::evals_per_step] == pytest.approx([0.0, 0.5])


def test_reuse_keeps_the_recompute_steps_timestep_unless_fresh():
    for fresh, expected in ((False, [0.0, 0.0, 0.5, 0.5]), (True, [0.0, 0.25, 0.5, 0.75])):
        net = Recorder()
        sample(net, torch.zeros(1, 1, 1, 1), torch.tensor([0]), num_steps=4, recompute_steps=[0, 2],
               fresh_timestep=fresh)
        assert [c["s"][0] for c in net.calls] == pytest.approx(expected)


def test_recompute_steps_must_start_at_zero():
    with pytest.raises(ValueError, match="step 0"):
        sample(Recorder(), torch.zeros(1, 1, 2, 2), torch.tensor([0]), num_steps=2, recompute_steps=[1])


class GaussianFlow(torch.nn.Module):
    """Exact velocity of the linear path to data N(mu, sigma²): the ODE maps ε to mu + sigma·ε."""

    num_classes = 1
    decoupled = True

    def __init__(self, mu=2.0, sigma=0.5):
        super().__init__()
        self.mu, self.sigma = mu, sigma

    def encoder_output(self, x, t, y):
        return torch.zeros(len(x), 1, 1)

    def self_condition(self, h, t):
        return h

    def forward(self, x, t, y, s=None):
        a = t.view(-1, *[1] * (x.dim() - 1)).double()
        gain = (a * self.sigma**2 - (1 - a)) / (a**2 * self.sigma**2 + (1 - a) ** 2)
        return (self.mu + gain * (x.double() - a * self.mu)).to(x.dtype), s


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_ode_solvers_converge_to_the_exact_flow(solver):
    model, noise = GaussianFlow(), torch.randn(64, 1, 1, 1, generator=torch.Generator().manual_seed(0),
                                               dtype=torch.float64)
    exact = model.mu + model.sigma * noise
    errors = [(sample(model, noise, torch.zeros(64, dtype=torch.long), num_steps=n, solver=solver)
               - exact).abs().max().item() for n in (8, 16, 32, 64)]
    order = math.log2(errors[-2] / errors[-1])
    assert errors[-1] < (0.05 if solver == "euler" else 1e-3)
    assert order == pytest.approx(1.0 if solver == "euler" else 2.0, abs=0.2)


def test_heun_and_sde_converge_to_eulers_result():
    model, n = GaussianFlow(), 4000
    noise = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.zeros(n, dtype=torch.long)
    gaps = [(sample(model, noise, labels, num_steps=n, solver="heun")
             - sample(model, noise, labels, num_steps=n)).abs().max().item() for n in (25, 100, 400)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.01
    euler = sample(model, noise, labels, num_steps=400)
    sde = sample(model, noise, labels, num_steps=400, solver="sde", sde_diffusion=1.0,
                 generator=torch.Generator().manual_seed(2))
    # Pathwise the SDE differs; in distribution both reach N(mu, sigma²).
    assert not torch.allclose(sde, euler, atol=1e-2)
    assert sde.mean().item() == pytest.approx(euler.mean().item(), abs=0.03)
    assert sde.std().item() == pytest.approx(euler.std().item(), abs=0.03)


def official_euler(net, noise, labels, num_steps, cfg, interval, refresh_rate):
    """The official EulerSampler loop (stateful_flow_matching/sampling.py), written out literally."""
    steps = time_grid(num_steps)
    condition = torch.cat([torch.full_like(labels, net.num_classes), labels])
    x, state = noise, None
    for i, (t_cur, t_next) in enumerate(zip(steps[:-1], steps[1:])):
        t_cur = t_cur.repeat(len(x))
        if i % refresh_rate == 0:
            state = None
        out, state = net(torch.cat([x, x]), t_cur.repeat(2), condition, state)
        uncond, cond = out.chunk(2)
        w = cfg if interval[0] < t_cur[0] < interval[1] else 1.0
        x = x + (uncond + w * (cond - uncond)) * (t_next - steps[i])
    return x


@pytest.mark.parametrize("refresh_rate", [1, 3])
def test_uniform_sharing_reproduces_the_official_refresh_rule(refresh_rate):
    torch.manual_seed(0)
    model = DDT(in_channels=3, patch_size=2, hidden_size=32, num_heads=2, depth=4, encoder_depth=3,
                num_classes=10).eval()
    for p in model.parameters():  # non-trivial weights everywhere (the default init zeroes the output)
        torch.nn.init.normal_(p, std=0.2)
    noise, labels = torch.randn(3, 3, 8, 8), torch.tensor([1, 5, 9])
    with torch.no_grad():
        ours = sample(model, noise, labels, num_steps=7, cfg_scale=2.5, cfg_interval=(0.3, 1.0),
                      recompute_steps=uniform_recompute_steps(7, math.ceil(7 / refresh_rate)))
        official = official_euler(model, noise, labels, 7, 2.5, (0.3, 1.0), refresh_rate)
    assert torch.allclose(ours, official, rtol=1e-5, atol=1e-5)  # float32 round-off of batching


def test_uniform_schedule():
    assert uniform_recompute_steps(250, 125) == list(range(0, 250, 2))
    assert [len(uniform_recompute_steps(250, k)) for k in (125, 63, 50, 32)] == [125, 63, 50, 32]
    assert uniform_recompute_steps(10, 1) == [0] and uniform_recompute_steps(10, 10) == list(range(10))
    with pytest.raises(ValueError, match="num_recompute=11"):
        uniform_recompute_steps(10, 11)


def random_similarity(n, seed):
    states = [torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(seed))]
    for i in range(1, n):  # a drifting state, so that neighbours are more alike
        states.append(states[-1] + 0.6 * torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(seed + i)))
    return cosine_similarity_matrix(states)


@pytest.mark.parametrize("n,k,seed", [(7, 3, 0), (8, 4, 1), (9, 2, 2), (6, 6, 3), (6, 1, 4)])
def test_dp_is_optimal_against_brute_force(n, k, seed):
    sim = random_similarity(n, seed)
    steps = dp_recompute_steps(sim, k)
    best = min(schedule_cost(sim, (0,) + rest) for rest in itertools.combinations(range(1, n), k - 1))
    assert steps[0] == 0 and len(steps) == k and steps == sorted(set(steps))
    assert schedule_cost(sim, steps) == pytest.approx(best, abs=1e-9)


def test_cosine_similarity_matrix():
    a = torch.randn(2, 5, 8)
    sim = cosine_similarity_matrix([a, 3 * a, -a])
    assert torch.allclose(sim, torch.tensor([[1.0, 1, -1], [1, 1, -1], [-1, -1, 1]]), atol=1e-6)


def test_compiled_blocks_sample_what_eager_blocks_sample():
    from ddt.models import compile_model

    torch.manual_seed(0)
    model = DDT(in_channels=3, patch_size=4, hidden_size=32, num_heads=2, depth=4, encoder_depth=3, num_classes=10).eval()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    noise, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    kwargs = dict(num_steps=6, cfg_scale=2.0, cfg_interval=(0.2, 0.9), recompute_steps=[0, 3])
    eager = sample(model, noise, labels, **kwargs)
    compiled = sample(compile_model(model), noise, labels, **kwargs)
    assert (compiled - eager).abs().max() < 1e-5
    compile_model(model, enabled=False)  # sampler.compile=false after a compiled training run
    assert torch.equal(sample(model, noise, labels, **kwargs), eager)


def tiny_ddt() -> DDT:
    """A 2-block DDT whose output layer is not zero, so that the samples depend on the network."""
    torch.manual_seed(0)
    model = DDT(in_channels=3, patch_size=4, hidden_size=32, num_heads=2, depth=2, encoder_depth=1, num_classes=10)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    return model.eval()


def sampled_pngs(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


SPLIT_SAMPLING = dict(num_samples=10, seed=3, latent_shape=(3, 16, 16), progress=False)


def split_sampler_kwargs(solver: str) -> dict:
    return {"num_steps": 4, "solver": solver, "cfg_scale": 2.0, "cfg_interval": (0.2, 0.9)}


@pytest.mark.parametrize("solver", ["euler", "heun", "sde", "adams"])
def test_every_solver_samples_the_same_images_for_any_batch_size(tmp_path, solver):
    """Image i's initial and (SDE) step noise come from (seed, i): neither the batch it falls in nor its
    neighbours change it."""
    from ddt.samples import generate_samples

    model = tiny_ddt()
    for batch_size in (2, 5):
        generate_samples(model, tmp_path / f"batch{batch_size}", batch_size=batch_size,
                         sampler_kwargs=split_sampler_kwargs(solver), **SPLIT_SAMPLING)
    two, five = sampled_pngs(tmp_path / "batch2"), sampled_pngs(tmp_path / "batch5")
    assert len(two) == 10 and two == five


def test_per_image_step_noise_needs_one_generator_per_image():
    model, noise = tiny_ddt(), torch.randn(3, 3, 16, 16)
    with pytest.raises(ValueError, match="2 step-noise generators for 3 images"):
        sample(model, noise, torch.zeros(3, dtype=torch.long), num_steps=2, solver="sde",
               generator=[torch.Generator(), torch.Generator()])
