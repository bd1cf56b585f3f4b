"""Cluster glue: entry points that start fgic.ddp on a node or a Slurm allocation."""
