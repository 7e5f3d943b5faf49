"""Generated multi-turn conversations with a fictional library's assistant (offline, seeded).

Each conversation asks for a book on a topic, then (in either order) where it is and whether
it can be borrowed for some weeks; later questions say "it", so the answers depend on earlier
turns. The facts (titles, authors, shelves, the three-week limit) are invented, so a model can
only know them by training. Train and test conversations use disjoint phrasings of every
question, over the same catalogue.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tinker_cookbook.renderers import Message, Renderer, TrainOnWhat
from tinker_cookbook.supervised.data import ConversationDataset, SupervisedDataset

SYSTEM = "You are the assistant of the Orrin Street Library. Answer in one short sentence."
MAX_WEEKS = 3

# topic, title, author, shelf
CATALOGUE = [
    ("volcanoes", "Fire Under Pell", "Mara Quist", "B4"),
    ("sailing", "The Salt Ledger", "Tomas Vey", "C2"),
    ("beekeeping", "Hum of the Hive", "Ada Morrow", "A7"),
    ("chess", "Sixty-Four Doors", "Ivo Lenk", "D1"),
    ("astronomy", "Lanterns of Kesh", "Nadia Orr", "A2"),
    ("baking", "Crumb and Crust", "Pia Holm", "E5"),
    ("gardening", "The Patient Seed", "Ravi Sund", "B1"),
    ("clocks", "Gears of Noon", "Lena Falk", "C6"),
    ("rivers", "Where Water Turns", "Oskar Brann", "D3"),
    ("birds", "Small Wings Over Orrin", "Juno Tell", "E2"),
    ("maps", "Lines Drawn Twice", "Hugo Marr", "A5"),
    ("knots", "Tied Fast", "Selma Rusk", "C4"),
]

ASK_BOOK = {
    "train": ["Do you have a book about {topic}?", "I'm looking for something on {topic}.",
              "Is there a good book on {topic} here?", "Can you recommend a book about {topic}?"],
    "test": ["Any books on {topic} in this library?", "What do you have about {topic}?"],
}
ASK_SHELF = {
    "train": ["Where can I find it?", "Which shelf is it on?", "Where is it kept?"],
    "test": ["Where should I look for it?", "What shelf, please?"],
}
ASK_BORROW = {
    "train": ["Can I borrow it for {weeks} weeks?", "May I take it home for {weeks} weeks?"],
    "test": ["Could I keep it for {weeks} weeks?"],
}


def conversation(rng: random.Random, split: str) -> list[Message]:
    """One three-turn conversation in the ``train`` or ``test`` phrasings."""
    topic, title, author, shelf = rng.choice(CATALOGUE)
    weeks = rng.randint(1, 6)
    borrow = (f"Yes, you can keep it for {weeks} weeks." if weeks <= MAX_WEEKS
              else f"Sorry, the limit is {MAX_WEEKS} weeks.")
    follow_ups = [
        (rng.choice(ASK_SHELF[split]), f"It is on shelf {shelf}."),
        (rng.choice(ASK_BORROW[split]).format(weeks=weeks), borrow),
    ]
    rng.shuffle(follow_ups)
    turns = [(rng.choice(ASK_BOOK[split]).format(topic=topic), f"We have '{title}' by {author}."), *follow_ups]
    messages = [Message(role="system", content=SYSTEM)]
    for question, answer in turns:
        messages += [Message(role="user", content=question), Message(role="assistant", content=answer)]
    return messages


def conversations(n: int, split: str, seed: int) -> list[list[Message]]:
    rng = random.Random(f"{split}-{seed}")
    return [conversation(rng, split) for _ in range(n)]


@dataclass
class LibraryChatBuilder:
    """``train_size`` training conversations trained on ``train_on_what``; ``test_size`` held-out
    ones always scored on every assistant message (so runs with different options compare)."""

    batch_size: int
    train_size: int = 96
    test_size: int = 16
    train_on_what: TrainOnWhat = TrainOnWhat.ALL_ASSISTANT_MESSAGES
    max_length: int | None = 256
    seed: int = 0

    def __call__(self, renderer: Renderer) -> tuple[SupervisedDataset, SupervisedDataset | None]:
        train_rows = [{"messages": m} for m in conversations(self.train_size, "train", self.seed)]
        train = ConversationDataset(train_rows, renderer, self.batch_size, self.max_length, self.train_on_what)
        if not self.test_size:
            return train, None
        test_rows = [{"messages": m} for m in conversations(self.test_size, "test", self.seed)]
        test = ConversationDataset(test_rows, renderer, self.test_size, self.max_length,
                                   TrainOnWhat.ALL_ASSISTANT_MESSAGES, shuffle=False)
        return train, test
