"""REPA with a DINOv2-architecture timm ViT loaded from a weights file, and the SD-VAE codec."""
import pytest
import torch

from ddt.data.pixels import ImageTensors
from ddt.models import DDT
from ddt.models.repa import RepaLoss, TargetEncoder
from ddt.models.vae import LatentCodec
from ddt.objective import Objective
from ddt.train import Trainer, TrainConfig
from tiny import TINY_DINOV2


def tiny_model(encoder_depth=3):
    torch.manual_seed(0)
    return DDT(in_channels=3, patch_size=4, hidden_size=32, num_heads=2, depth=4, encoder_depth=encoder_depth,
               num_classes=10)


def repa_objective(tiny_dinov2, align_layer=2, grid=4):
    target = TargetEncoder("vit_small_patch14_dinov2", str(tiny_dinov2), grid_size=grid, **TINY_DINOV2)
    torch.manual_seed(1)
    return Objective(repa=RepaLoss(target, hidden_size=32, align_layer=align_layer, projector_dim=64))


def batch(n=8, size=16):
    g = torch.Generator().manual_seed(2)
    return {"images": torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
            "labels": torch.randint(0, 10, (n,), generator=g)}


def test_target_encoder_loads_the_file_through_timm(tiny_dinov2):
    from safetensors.torch import load_file

    encoder = TargetEncoder("vit_small_patch14_dinov2", str(tiny_dinov2), grid_size=4, **TINY_DINOV2)
    saved = load_file(str(tiny_dinov2))
    assert torch.equal(encoder.net.state_dict()["blocks.1.mlp.fc2.weight"], saved["blocks.1.mlp.fc2.weight"])
    assert saved["pos_embed"].shape[1] == 1 + 37 * 37 and encoder.net.pos_embed.shape[1] == 1 + 4 * 4  # resampled
    tokens = encoder(batch()["images"])
    assert tokens.shape == (8, 16, 32) and encoder.image_size == 56 and not tokens.requires_grad
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.net.training  # frozen: stays in eval mode


def test_missing_target_weights_say_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="repa.target_weights=.*nowhere.safetensors.*huggingface.co/timm"):
        TargetEncoder("vit_base_patch14_dinov2.lvd142m", str(tmp_path / "nowhere.safetensors"), grid_size=16)
    with pytest.raises(FileNotFoundError, match="repa.target_encoder=vit_base_patch14_dinov2.lvd142m.*target_weights"):
        TargetEncoder("vit_base_patch14_dinov2.lvd142m", None, grid_size=16)  # offline: the hub is unreachable


def test_capture_records_the_output_of_block_align_layer(tiny_dinov2):
    objective = repa_objective(tiny_dinov2, align_layer=3)  # the last encoder block of a 3en1de model
    model = tiny_model(encoder_depth=3).eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad(), objective.repa.capture(model) as hidden:
        model(x, t, y)
        h = model.encoder_output(x, t, y)
    assert len(hidden) == 2 and torch.equal(hidden[0], h)
    assert not model.blocks[2]._forward_hooks  # the hook is removed afterwards


def test_repa_step_trains_the_projector_and_lowers_the_alignment_loss(tiny_dinov2):
    objective, model, fixed = repa_objective(tiny_dinov2), tiny_model(), batch()
    params = [*model.parameters(), *objective.repa.projector.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    before_projector = {k: v.clone() for k, v in objective.trainable_state_dict().items()}

    def losses():
        return objective(model, fixed, torch.Generator().manual_seed(0))

    loss, terms = losses()
    assert set(terms) == {"fm_loss", "repa_loss"}
    assert torch.allclose(loss, terms["fm_loss"] + 0.5 * terms["repa_loss"])
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        _, after = losses()
    assert after["repa_loss"] < terms["repa_loss"]
    assert any(not torch.equal(before_projector[k], v) for k, v in objective.trainable_state_dict().items())
    assert all(p.grad is None for p in objective.repa.target.parameters())


def test_repa_training_resumes_exactly_with_its_projector(tiny_dinov2, tmp_path):
    g = torch.Generator().manual_seed(3)
    data = ImageTensors(torch.randint(0, 256, (24, 3, 16, 16), generator=g, dtype=torch.uint8),
                        torch.randint(0, 10, (24,), generator=g))
    cfg = TrainConfig(max_steps=4, batch_size=4, lr=1e-3, ema_decay=0.9, ckpt_every=2, log_every=1)

    def trainer(run_dir, max_steps):
        return Trainer(tiny_model(), data, TrainConfig(**{**cfg.__dict__, "max_steps": max_steps}), run_dir=run_dir,
                       seed=0, objective=repa_objective(tiny_dinov2), progress=False)

    straight = trainer(tmp_path / "a", 4)
    stats = straight.fit()
    assert stats["final_repa_loss"] > 0 and "final_fm_loss" in stats
    trainer(tmp_path / "b", 2).fit()
    resumed = trainer(tmp_path / "b", 4)
    resumed.load(tmp_path / "b" / "checkpoints" / "last.pt")
    resumed.fit()
    for a, b in ((straight.model, resumed.model), (straight.objective.repa.projector, resumed.objective.repa.projector)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    plain = Trainer(tiny_model(), data, cfg, run_dir=tmp_path / "c", seed=0, progress=False)
    with pytest.raises(ValueError, match="REPA projector but repa is off"):
        plain.load(tmp_path / "b" / "checkpoints" / "last.pt")


def test_latent_codec_round_trip_from_a_saved_folder(tiny_vae, tmp_path):
    codec = LatentCodec.from_pretrained(str(tiny_vae))
    assert codec.scaling_factor == pytest.approx(0.18215) and codec.downsample == 8 and codec.latent_channels == 4
    images = batch(3, 32)["images"]
    mean, std = codec.moments(images)
    assert mean.shape == std.shape == (3, 4, 4, 4) and (std > 0).all()
    a = codec.encode(images, torch.Generator().manual_seed(0))
    b = codec.encode(images, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and torch.allclose(a, (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))) * 0.18215)
    decoded = codec.decode(a, chunk_size=2)
    assert decoded.shape == (3, 3, 32, 32) and decoded.dtype == torch.uint8
    assert torch.equal(decoded, codec.decode(a))  # chunking does not change the result
    with pytest.raises(FileNotFoundError, match="resolution.vae=.*missing.*save_pretrained"):
        LatentCodec.from_pretrained(str(tmp_path / "missing"))
