"""Reinforcement learning: environments, rollouts, advantages, and the training loop."""
