"""Networks: the DDT and its size presets."""
from ddt.models.ddt import DDT, DDT_PRESETS, build_ddt

__all__ = ["DDT", "DDT_PRESETS", "build_ddt"]
