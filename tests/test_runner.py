"""Runner pieces that a whole launch would only show indirectly."""
import torch

from ddt.models import DDT
from ddt.runner import recompute_schedule


def test_dp_schedule_is_computed_once_per_weights_and_settings(tmp_path, compose):
    from ddt.config import validate

    plain = validate(compose("sampler.sharing=dp", "sampler.num_recompute=4", "sampler.num_steps=8",
                             "sampler.dp_template_size=2"))
    torch.manual_seed(0)
    model = DDT(in_channels=3, patch_size=4, hidden_size=32, num_heads=2, depth=3, encoder_depth=2, num_classes=10)
    path = tmp_path / "sharing_schedule.json"
    first = recompute_schedule(model, plain, path, {"step": 1}, (3, 16, 16))
    stamp = path.stat().st_mtime_ns
    again = recompute_schedule(model, plain, path, {"step": 1}, (3, 16, 16))
    assert again == first and path.stat().st_mtime_ns == stamp  # read back, not recomputed
    assert len(first["recompute_steps"]) == 4 and first["sharing_ratio"] == 0.5
    recompute_schedule(model, plain, path, {"step": 2}, (3, 16, 16))  # other weights: recomputed
    assert path.stat().st_mtime_ns != stamp
