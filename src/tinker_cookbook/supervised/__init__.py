"""Supervised fine-tuning: datasets of weighted token sequences and a pipelined training loop."""
