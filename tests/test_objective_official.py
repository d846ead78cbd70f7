"""The training objective against the official REPATrainer's recorded losses and gradients, and the REPA
projector of an official (or a suite) checkpoint when training starts from it."""
import pytest
import torch

from conftest import REFERENCE, launch
from ddt.checkpoint import atomic_save, to_official_lightning
from ddt.flow import FlowDraws
from ddt.models import DDT
from ddt.models.repa import RepaLoss
from ddt.objective import Objective


@pytest.fixture(scope="module")
def official():
    return torch.load(REFERENCE / "ddt_official_objective_tiny.pt", weights_only=True)


class TokenWidth(torch.nn.Module):
    """Stands in for the target encoder where only its token width matters (the test passes the tokens)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim


def official_objective(official) -> tuple[DDT, Objective]:
    """Our denoiser and objective with the official weights and trainer settings."""
    trainer = official["trainer"]
    model = DDT.from_official(official["config"], official["denoiser"])
    repa = RepaLoss(TokenWidth(trainer["proj_encoder_dim"]), hidden_size=trainer["proj_denoiser_dim"],
                    align_layer=trainer["align_layer"], projector_dim=trainer["proj_hidden_dim"],
                    weight=trainer["feat_loss_weight"])
    repa.projector.load_state_dict({k.removeprefix("0."): v for k, v in official["projector"].items()})
    return model, Objective(repa=repa, label_dropout=trainer["null_condition_p"])


def max_error(ours: dict, theirs: dict) -> float:
    assert set(ours) == set(theirs)
    return max((ours[k] - theirs[k]).abs().max().item() for k in theirs)


def test_losses_and_gradients_equal_the_official_trainer(official):
    model, objective = official_objective(official)
    inputs = official["inputs"]
    assert inputs["null_label"] == model.num_classes
    draws = FlowDraws(t=inputs["t"], noise=inputs["noise"], dropped=inputs["dropped"])
    loss, terms = objective.losses(model, inputs["x"], inputs["labels"], draws, official["target_tokens"])
    loss.backward()
    errors = {"fm_loss": (terms["fm_loss"] - official["fm_loss"]).abs().item(),
              "repa_loss": (terms["repa_loss"] - official["repa_loss"]).abs().item(),
              "loss": (loss - official["loss"]).abs().item(),
              "grads_denoiser": max_error({k: p.grad for k, p in model.named_parameters()}, official["grads_denoiser"]),
              "grads_projector": max_error({f"0.{k}": p.grad for k, p in objective.repa.projector.named_parameters()},
                                           official["grads_projector"])}
    print("max abs errors against the official objective:", errors)
    assert max(errors.values()) < 1e-5, errors


#################################################################################
#        The REPA projector of a checkpoint that training starts from           #
#################################################################################

@pytest.fixture(scope="module")
def official_fit(tmp_path_factory, tiny_vae):
    """Overrides for a toy ImageNet run whose model is the fixture's (4 channels, width 64, 4en2de, 10 classes)
    and whose DINOv2 stand-in gives the fixture's 384-d tokens (a 1-block ViT-S/14, random weights)."""
    from tiny import save_image_folder, save_tiny_dinov2

    tmp = tmp_path_factory.mktemp("official-fit")
    dinov2 = save_tiny_dinov2(tmp / "vit-s-1block.safetensors", embed_dim=384, depth=1, num_heads=6)
    return ["resolution=r256", "resolution.image_size=32", "resolution.latent_size=4", f"resolution.vae={tiny_vae}",
            "data=imagenet", f"data.root={save_image_folder(tmp / 'train', corrupt=False)}", "data.num_classes=10",
            "data.num_workers=0", "model=ddt_s", "model.depth=6", "model.encoder_depth=4", "model.hidden_size=64",
            "model.num_heads=4", "train=smoke", "train.max_steps=1", "train.batch_size=4", "stage=train",
            "eval=none", "progress=false", f"cache_dir={tmp / 'cache'}",
            "repa=on", "repa.target_encoder=vit_small_patch14_dinov2", f"repa.target_weights={dinov2}",
            "repa.target_kwargs={depth:1}", "repa.align_layer=2"]  # repa.projector_dim: the default (model width)


def official_checkpoint(official, path, projector: dict | None) -> str:
    """The fixture's denoiser (as denoiser and EMA) and a projector in the released Lightning layout."""
    atomic_save(to_official_lightning(official["denoiser"], official["denoiser"], projector), path)
    return str(path)


def fixture_projector(official, width: int | None = None) -> dict:
    """The fixture's projector in our key names, or a random one of another hidden width."""
    if width is None:
        return {k.removeprefix("0."): v for k, v in official["projector"].items()}
    layers = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                                 torch.nn.SiLU(), torch.nn.Linear(width, 384))
    return layers.state_dict()


@pytest.fixture
def training_start(monkeypatch):
    """What training starts from: the model and the objective's projector when Trainer.fit is called."""
    from ddt.train import Trainer

    seen, fit = {}, Trainer.fit

    def spy(self):
        seen["model"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        seen["projector"] = {k: v.clone() for k, v in self.objective.trainable_state_dict().items()}
        return fit(self)

    monkeypatch.setattr(Trainer, "fit", spy)
    return seen


def test_official_checkpoint_starts_training_with_its_projector(official, official_fit, compose, tmp_path,
                                                                 training_start):
    from ddt.runner import run

    ckpt = official_checkpoint(official, tmp_path / "model.ckpt", fixture_projector(official))
    results = run(compose(*official_fit, f"ckpt={ckpt}"), tmp_path / "run")
    assert results["status"] == "completed"
    expected = fixture_projector(official)
    assert set(training_start["projector"]) == set(expected)
    assert all(torch.equal(training_start["projector"][k], v) for k, v in expected.items())
    assert all(torch.equal(training_start["model"][k], v) for k, v in official["denoiser"].items())


def test_official_checkpoint_without_projector_starts_a_fresh_one(official, official_fit, compose, tmp_path,
                                                                 training_start, caplog):
    from ddt.runner import run

    ckpt = official_checkpoint(official, tmp_path / "model.ckpt", None)
    with caplog.at_level("INFO", logger="ddt.runner"):
        assert run(compose(*official_fit, f"ckpt={ckpt}"), tmp_path / "run")["status"] == "completed"
    assert "holds no REPA projector (trained without REPA): the projector starts from scratch" in caplog.text


def one_line_failure(cfg, run_dir) -> str:
    """The message of a run that must stop before any work, checked to be one line."""
    from ddt.errors import UsageError
    from ddt.runner import run

    with pytest.raises(UsageError) as err:
        run(cfg, run_dir)
    message = str(err.value)
    print(message)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_official_checkpoint_of_another_width_fails_with_one_line_naming_both(official, official_fit, compose,
                                                                               tmp_path):
    ckpt = official_checkpoint(official, tmp_path / "model.ckpt", fixture_projector(official, width=2048))
    message = one_line_failure(compose(*official_fit, f"ckpt={ckpt}"), tmp_path / "run")
    assert (f"{ckpt} holds a REPA projector of hidden width 2048 (64 -> 2048 -> 2048 -> 384) but "
            f"repa.projector_dim=64 builds 64 -> 64 -> 64 -> 384; set repa.projector_dim=2048") in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_suite_checkpoint_of_the_old_width_fails_with_one_line_on_resume_and_as_ckpt(official_fit, compose,
                                                                                      tmp_path):
    from ddt.runner import run

    old = tmp_path / "old"
    assert run(compose(*official_fit, "repa.projector_dim=128"), old)["status"] == "completed"  # REPA's 2048, small
    last = old / "checkpoints" / "last.pt"
    message = one_line_failure(compose(*official_fit, "train.max_steps=2"), old)  # resume with the new default
    assert (f"{last} holds a REPA projector of hidden width 128 (64 -> 128 -> 128 -> 384) but repa.projector_dim=64 "
            f"builds 64 -> 64 -> 64 -> 384; set repa.projector_dim=128") in message
    assert torch.load(last, weights_only=True)["step"] == 1  # stopped before any work
    assert "hidden width 128" in one_line_failure(compose(*official_fit, f"ckpt={last}"), tmp_path / "finetune")
    assert not (tmp_path / "finetune" / "checkpoints").exists()
    resumed = run(compose(*official_fit, "repa.projector_dim=128", "train.max_steps=2"), old)  # its width: resumes
    assert resumed["status"] == "completed" and resumed["train"]["step"] == 2
