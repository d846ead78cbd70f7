"""Networks: the DDT, the Improved-SiT baseline and their size presets."""
from ddt.models.ddt import (ARCHS, DDT, DDT_PRESETS, HEAD_PRESETS, SiT, build_ddt, build_model,
                            compile_model, model_from_config)

__all__ = ["ARCHS", "DDT", "DDT_PRESETS", "HEAD_PRESETS", "SiT", "build_ddt", "build_model", "compile_model",
           "model_from_config"]
