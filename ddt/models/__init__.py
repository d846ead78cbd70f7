"""Networks: the DDT and the Improved-SiT baseline (their sizes are conf/model's: ddt.config.build_ddt)."""
from ddt.models.ddt import ARCHS, DDT, SiT, build_model, compile_model, model_from_config

__all__ = ["ARCHS", "DDT", "SiT", "build_model", "compile_model", "model_from_config"]
