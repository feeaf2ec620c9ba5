"""The ``gsr`` command (``main``) and the workflows it runs: ``quantize`` (a recipe
in, a checkpoint out), ``compare`` (a grid of settings), ``recipes`` (the shipped YAML)."""

from gsr_plugin.cli.main import main

__all__ = ["main"]
