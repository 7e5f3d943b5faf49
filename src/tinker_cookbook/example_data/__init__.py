"""Small bundled data: ``conversations.jsonl`` (60 chats with a made-up Zorblax travel guide) and
``comparisons.jsonl`` (64 labeled answer pairs to arithmetic questions, for DPO)."""
