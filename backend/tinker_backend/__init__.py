"""The self-hostable Tinker server: API, store, scheduler and the LoRA engine."""
