"""Samplers for the DDT velocity field (t = 0 noise -> t = 1 data) and encoder-sharing schedules."""
from ddt.sampling.sharing import (SHARING, cosine_similarity_matrix, dp_recompute_steps, schedule_cost,
                                  statistical_schedule, uniform_recompute_steps)
from ddt.sampling.multistep import adams_weights
from ddt.sampling.solvers import SOLVERS, SamplingStats, sample, time_grid

__all__ = ["SHARING", "SOLVERS", "SamplingStats", "adams_weights", "cosine_similarity_matrix", "dp_recompute_steps", "sample",
           "schedule_cost", "statistical_schedule", "time_grid",
           "uniform_recompute_steps"]
