"""The compute side: one copy of each base model, many LoRA adapters, losses and samplers."""
