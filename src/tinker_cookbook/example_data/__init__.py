"""Small bundled data: ``conversations.jsonl`` (60 chats with a made-up Zorblax travel guide)."""
