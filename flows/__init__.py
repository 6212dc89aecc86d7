"""Prefect flows: the distillation pipeline, scheduled regression checks, deployments."""
