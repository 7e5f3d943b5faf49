"""RL with verifiable math rewards: generated arithmetic, and GSM8K-style word problems."""
