"""Multi-agent RL recipes: guess the number, twenty questions, tic-tac-toe self-play."""
