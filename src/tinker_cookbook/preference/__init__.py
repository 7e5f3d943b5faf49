"""Preferences: labeled comparisons (``types``, ``datasets``) and DPO training (``train_dpo``)."""
