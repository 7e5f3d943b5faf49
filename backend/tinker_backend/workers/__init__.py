"""Where a base model's trainer runs: in the server process, or in worker processes it supervises."""
