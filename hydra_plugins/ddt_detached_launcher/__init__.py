"""`hydra/launcher=submitit_slurm_detached`: submit a sweep to SLURM and return at once (see launcher.py)."""
