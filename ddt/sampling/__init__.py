"""Samplers for the DDT velocity field (t = 0 noise -> t = 1 data)."""
from ddt.sampling.euler import sample, time_grid

__all__ = ["sample", "time_grid"]
