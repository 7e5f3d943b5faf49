"""Logging, plots, CLI parsing, LR schedules and progress bars shared by the loops and recipes."""
