"""The word list of the tiny random BERTs the tests build (conftest.py's fixtures, test_export's wide one).

A module of its own: test modules import it by name, while ``conftest`` is not one module (each folder
may have its own).
"""

WORDS = ["the", "a", "my", "card", "has", "not", "arrived", "yet", "where", "is", "money", "transfer"]
WORDS += ["account", "balance", "top", "up", "why", "declined"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
