"""RLHF in three stages on verifier-labelled arithmetic preferences (``python -m tinker_cookbook.recipes.rlhf.train``)."""
