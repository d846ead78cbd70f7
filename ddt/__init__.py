"""DDT experiment suite: the library (models, flow matching, sampling, training, evaluation).

Importable without Hydra; `launch.py` and `ddt.runner` wire it to the configs in conf/.
"""
