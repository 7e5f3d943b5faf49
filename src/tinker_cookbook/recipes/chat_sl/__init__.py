"""Multi-turn chat SFT on generated library conversations (see ``train``)."""
