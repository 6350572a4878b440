"""The word list and example texts of the tiny random BERTs the tests build (conftest.py, test_export).

A module of its own: test modules import it by name, while ``conftest`` is not one module (each folder
may have its own).
"""

WORDS = ["the", "a", "my", "card", "has", "not", "arrived", "yet", "where", "is", "money", "transfer"]
WORDS += ["account", "balance", "top", "up", "why", "declined"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
TEXTS = (  # queries in that vocabulary
    "my card has not arrived yet",
    "top up",
    "why is my transfer declined",
    "where is my money",
    "balance",
    "the account top up has not arrived yet why",
    "card declined",
)
