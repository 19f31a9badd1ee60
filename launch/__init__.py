"""Launching training on one or many nodes (the deepspeed launcher, SLURM, MPI)."""
