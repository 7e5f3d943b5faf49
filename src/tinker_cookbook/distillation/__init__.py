"""Distillation: train a student to behave like a teacher.

* :mod:`~tinker_cookbook.distillation.on_policy`: the student samples, a teacher sampler
  scores the sampled tokens, and the per-token reverse KL is the (negative) advantage.
* :mod:`~tinker_cookbook.distillation.prompt_distillation`: context distillation; the teacher
  is a model prompted with a (long) system prompt, the student is fine-tuned on its answers
  without that prompt.
* :mod:`~tinker_cookbook.distillation.datasets`: prompt-only environments and datasets.
"""
