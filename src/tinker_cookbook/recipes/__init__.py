"""Runnable recipes: ``python -m tinker_cookbook.recipes.NAME key=value ...`` (see README.md)."""
