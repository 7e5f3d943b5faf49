"""Renderers, RL environments, training loops and recipes on top of the Tinker primitives."""
