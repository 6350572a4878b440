"""The built-in offline task: synthetic banking intents whose users differ in phrasing and labeling.

The generative story, all drawn from one seeded ``random.Random`` (nothing downloads):

1. The task has ``num_labels`` intents, the first of ``INTENTS`` (``card_lost``,
   ``transfer_money``, ...). Each intent has five sentence templates with slots (``{card}``,
   ``{amount}``, ...) filled from a shared vocabulary of synonyms.
2. Each user draws a personal **style**: three of the five templates of every intent (the
   only ones that user writes), a preferred synonym for every slot (used 80% of the time), an
   opening, a sign-off and a pet word that appear in most of their messages.
3. Each user draws a personal **labeling convention**: ``round(swap_fraction * num_labels / 2)``
   disjoint pairs of intents whose labels that user swaps (e.g. this user files "where is my
   money" under ``card_lost`` and lost cards under ``check_balance``). A message's label is the
   user's label for the intent it was written from, so the same sentence can carry different
   labels for different users, and no single model can be right for every user.
4. Each user draws a label mix from a symmetric Dirichlet(``label_alpha``) and writes
   ``examples_per_user`` messages: an intent from the mix, then one of the user's templates in
   the user's style.

A model trained on one user's own data can learn that user's convention; a global model trained
on everyone's data cannot fit the swaps (the same intent carries different labels across users),
so personalization has a measurable margin to win. ``swap_fraction=0`` removes it.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedadapt.data.dataset import TextDataset
from fedadapt.errors import ConfigError

TEMPLATES: Mapping[str, tuple[str, ...]] = {
    "card_lost": (
        "i lost my {card}",
        "my {card} is gone and i cannot find it",
        "someone stole my {card} {time}",
        "i think i left my {card} somewhere {time}",
        "how do i block my missing {card}",
    ),
    "transfer_money": (
        "send {amount} to my {person}",
        "i want to transfer {amount} to another {account}",
        "how do i move {amount} to my {person}",
        "please wire {amount} from my {account}",
        "can i pay my {person} {amount} {time}",
    ),
    "check_balance": (
        "how much money is in my {account}",
        "what is my {account} balance",
        "show me what is left on my {account}",
        "do i still have {amount} in my {account}",
        "tell me my balance {time}",
    ),
    "card_declined": (
        "my {card} was declined {time}",
        "why did the shop refuse my {card}",
        "the payment of {amount} with my {card} failed",
        "my {card} does not work at the terminal",
        "the machine rejected my {card} {time}",
    ),
    "exchange_rate": (
        "what rate do i get for {currency}",
        "how much is {amount} in {currency}",
        "what is the exchange rate to {currency} {time}",
        "can i change {amount} into {currency}",
        "is the {currency} rate good {time}",
    ),
    "top_up": (
        "add {amount} to my {account}",
        "i want to top up {amount}",
        "how do i put {amount} on my {card}",
        "my top up of {amount} has not arrived",
        "can i load {amount} {time}",
    ),
    "change_pin": (
        "i want a new pin for my {card}",
        "how do i change the pin of my {card}",
        "i forgot the pin of my {card}",
        "reset my {card} pin {time}",
        "where can i update my pin",
    ),
    "close_account": (
        "i want to close my {account}",
        "please delete my {account} {time}",
        "how do i shut down my {account}",
        "cancel my {account} and send the rest to my {person}",
        "i am leaving the bank, close everything {time}",
    ),
}
INTENTS: tuple[str, ...] = tuple(TEMPLATES)

SLOTS: Mapping[str, tuple[str, ...]] = {
    "card": ("card", "debit card", "visa", "bank card", "credit card"),
    "account": ("account", "savings account", "current account", "wallet", "main account"),
    "person": ("friend", "mother", "landlord", "brother", "colleague"),
    "amount": ("50 euros", "100 dollars", "20 pounds", "500 euros", "a few bucks"),
    "currency": ("dollars", "euros", "yen", "pounds", "francs"),
    "time": ("today", "yesterday", "this morning", "last night", "right now"),
}
OPENINGS = ("hi", "hello", "hey there", "good morning", "excuse me", "quick question", "dear bank", "yo")
SIGN_OFFS = ("thanks", "thank you", "cheers", "asap please", "regards", "thx", "help", "urgent")
PET_WORDS = ("honestly", "basically", "kindly", "literally", "seriously", "actually", "mate", "again")

_TEMPLATES_PER_USER = 3
_PREFERRED_SYNONYM = 0.8
_STYLE_RATE = 0.7  # how often a user's opening, sign-off and pet word each appear

SYNTHETIC = "synthetic"  # the data source name of this task, in scenarios and `fedadapt train --data`


@dataclass(frozen=True)
class SyntheticConfig:
    """Size, seed and degree of user difference of the synthetic task."""

    num_users: int = 8
    examples_per_user: int = 80
    num_labels: int = 6
    seed: int = 0
    swap_fraction: float = 0.34
    label_alpha: float = 1.0

    def __post_init__(self) -> None:
        if self.num_users < 1:
            raise ConfigError(f"num_users must be a positive integer, got {self.num_users!r}")
        if self.examples_per_user < 1:
            raise ConfigError(f"examples_per_user must be a positive integer, got {self.examples_per_user!r}")
        if not 2 <= self.num_labels <= len(INTENTS):
            raise ConfigError(f"num_labels must be in [2, {len(INTENTS)}], got {self.num_labels!r}")
        if not 0.0 <= self.swap_fraction <= 1.0:
            raise ConfigError(f"swap_fraction must be in [0, 1], got {self.swap_fraction!r}")
        if self.label_alpha <= 0.0:
            raise ConfigError(f"label_alpha must be positive, got {self.label_alpha!r}")

    @property
    def intents(self) -> tuple[str, ...]:
        """The intents (and label names) in use."""
        return INTENTS[: self.num_labels]

    @property
    def num_swapped_pairs(self) -> int:
        """Pairs of labels each user swaps."""
        return min(round(self.swap_fraction * self.num_labels / 2), self.num_labels // 2)


@dataclass(frozen=True)
class SyntheticUser:
    """One user's style and labeling convention (``label_of[intent]`` is that user's label)."""

    user_id: str
    templates: Mapping[str, tuple[str, ...]]
    synonyms: Mapping[str, str]
    opening: str
    sign_off: str
    pet_word: str
    label_of: Mapping[str, str]
    label_weights: tuple[float, ...]


def make_synthetic_users(config: SyntheticConfig) -> tuple[SyntheticUser, ...]:
    """Every user's style and convention, drawn from ``config.seed``."""
    rng = random.Random(config.seed)
    return tuple(
        _draw_user(f"user_{u:02d}", config, random.Random(rng.getrandbits(64))) for u in range(config.num_users)
    )


def make_synthetic_dataset(config: SyntheticConfig) -> TextDataset:
    """The synthetic task's examples, user by user; the same config gives the same data."""
    texts: list[str] = []
    labels: list[str] = []
    user_ids: list[str] = []
    rng = random.Random(f"examples-{config.seed}")
    for user in make_synthetic_users(config):
        for _ in range(config.examples_per_user):
            intent = rng.choices(config.intents, weights=user.label_weights)[0]
            texts.append(_write(user, intent, rng))
            labels.append(user.label_of[intent])
            user_ids.append(user.user_id)
    return TextDataset(
        texts=tuple(texts), labels=tuple(labels), user_ids=tuple(user_ids), source=f"synthetic(seed={config.seed})"
    )


def write_user_files(config: SyntheticConfig, folder: Path) -> dict[str, Path]:
    """One CSV per user in ``folder`` (``<user_id>.csv``: a ``text,label`` header, then the user's examples).

    The files a phone's trainer reads (export/phone_trainer.py) or ``fedadapt train --data`` takes.
    Existing files are not overwritten: ConfigError names the first one.
    """
    data = make_synthetic_dataset(config)
    users = sorted(set(data.user_ids or ()))
    paths = {user: folder / f"{user}.csv" for user in users}
    taken = [path for path in paths.values() if path.exists()]
    if taken:
        raise ConfigError(f"{taken[0]} exists; choose another --out or remove it")
    folder.mkdir(parents=True, exist_ok=True)
    for user, path in paths.items():
        with path.open("x", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(
                (text, label)
                for text, label, owner in zip(data.texts, data.labels, data.user_ids or (), strict=True)
                if owner == user
            )
    return paths


def _draw_user(user_id: str, config: SyntheticConfig, rng: random.Random) -> SyntheticUser:
    intents = config.intents
    shuffled = rng.sample(intents, len(intents))
    label_of = dict(zip(intents, intents, strict=True))
    for i in range(config.num_swapped_pairs):
        a, b = shuffled[2 * i], shuffled[2 * i + 1]
        label_of[a], label_of[b] = b, a
    weights = [rng.gammavariate(config.label_alpha, 1.0) for _ in intents]
    total = sum(weights) or 1.0
    return SyntheticUser(
        user_id=user_id,
        templates={intent: tuple(rng.sample(TEMPLATES[intent], _TEMPLATES_PER_USER)) for intent in intents},
        synonyms={slot: rng.choice(words) for slot, words in SLOTS.items()},
        opening=rng.choice(OPENINGS),
        sign_off=rng.choice(SIGN_OFFS),
        pet_word=rng.choice(PET_WORDS),
        label_of=label_of,
        label_weights=tuple(w / total for w in weights),
    )


def _write(user: SyntheticUser, intent: str, rng: random.Random) -> str:
    fills = {
        slot: user.synonyms[slot] if rng.random() < _PREFERRED_SYNONYM else rng.choice(words)
        for slot, words in SLOTS.items()
    }
    words = rng.choice(user.templates[intent]).format(**fills).split()
    if rng.random() < _STYLE_RATE:
        words.insert(rng.randrange(len(words) + 1), user.pet_word)
    if rng.random() < _STYLE_RATE:
        words.insert(0, user.opening + ",")
    if rng.random() < _STYLE_RATE:
        words.append(user.sign_off)
    return " ".join(words)
