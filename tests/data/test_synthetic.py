"""The synthetic per-user task: deterministic, and users genuinely differ."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import replace

import pytest

from fedadapt.data.synthetic import (
    INTENTS,
    SyntheticConfig,
    SyntheticUser,
    make_synthetic_dataset,
    make_synthetic_users,
)
from fedadapt.errors import ConfigError

CONFIG = SyntheticConfig()


def test_same_seed_same_data_other_seed_other_data() -> None:
    data = make_synthetic_dataset(CONFIG)
    assert make_synthetic_dataset(SyntheticConfig()) == data
    other = make_synthetic_dataset(replace(CONFIG, seed=1))
    assert other.texts != data.texts
    assert other.labels != data.labels


def test_shape_labels_and_user_ids() -> None:
    config = SyntheticConfig(num_users=3, examples_per_user=10, num_labels=4)
    data = make_synthetic_dataset(config)
    assert len(data) == 30
    assert set(data.labels) <= set(INTENTS[:4])
    assert data.user_ids is not None
    assert Counter(data.user_ids) == {"user_00": 10, "user_01": 10, "user_02": 10}
    assert all(text.strip() for text in data.texts)


def test_each_user_swaps_its_own_label_pairs() -> None:
    users = make_synthetic_users(CONFIG)
    for user in users:
        swapped = {intent: label for intent, label in user.label_of.items() if intent != label}
        assert len(swapped) == 2 * CONFIG.num_swapped_pairs == 2
        assert all(user.label_of[label] == intent for intent, label in swapped.items())  # pairs
    assert len({tuple(sorted(user.label_of.items())) for user in users}) > 1
    unswapped = make_synthetic_users(replace(CONFIG, swap_fraction=0.0))
    assert all(intent == label for user in unswapped for intent, label in user.label_of.items())


def _core(text: str, user: SyntheticUser) -> str:
    """The message without the user's opening, sign-off and pet word: the filled template."""
    core = text.removeprefix(user.opening + ", ").removesuffix(" " + user.sign_off)
    return " ".join(word for word in core.split() if word != user.pet_word)


def test_same_sentence_carries_different_labels_for_different_users() -> None:
    data = make_synthetic_dataset(CONFIG)
    users = {user.user_id: user for user in make_synthetic_users(CONFIG)}
    assert data.user_ids is not None
    labels_of_sentence: dict[str, dict[str, str]] = defaultdict(dict)
    for text, label, user_id in zip(data.texts, data.labels, data.user_ids, strict=True):
        labels_of_sentence[_core(text, users[user_id])][user_id] = label
    conflicting = [s for s, by_user in labels_of_sentence.items() if len(set(by_user.values())) > 1]
    assert len(conflicting) >= 3, conflicting


def test_users_have_different_label_mixes() -> None:
    data = make_synthetic_dataset(CONFIG)
    assert data.user_ids is not None
    mixes: dict[str, Counter[str]] = defaultdict(Counter)
    for label, user_id in zip(data.labels, data.user_ids, strict=True):
        mixes[user_id][label] += 1
    first, *others = mixes.values()
    distances = [sum(abs(first[k] - other[k]) for k in INTENTS) / (2 * CONFIG.examples_per_user) for other in others]
    assert max(distances) > 0.3


def _naive_bayes(examples: list[tuple[str, str]]) -> dict[str, tuple[float, Counter[str], int]]:
    by_label: dict[str, Counter[str]] = defaultdict(Counter)
    counts = Counter(label for _, label in examples)
    for text, label in examples:
        by_label[label].update(text.split())
    return {
        label: (math.log(n / len(examples)), by_label[label], by_label[label].total()) for label, n in counts.items()
    }


def _accuracy(model: dict[str, tuple[float, Counter[str], int]], examples: list[tuple[str, str]]) -> float:
    vocabulary = len({word for _, words, _ in model.values() for word in words}) + 1

    def score(text: str, label: str) -> float:
        prior, words, total = model[label]
        return prior + sum(math.log((words[w] + 1) / (total + vocabulary)) for w in text.split())

    hits = sum(max(model, key=lambda label: score(text, label)) == gold for text, gold in examples)
    return hits / len(examples)


def test_personal_models_beat_a_global_model() -> None:
    """Bag-of-words naive Bayes: one per user vs one on everyone's data, on each user's held-out data."""
    data = make_synthetic_dataset(CONFIG)
    assert data.user_ids is not None
    per_user: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for text, label, user_id in zip(data.texts, data.labels, data.user_ids, strict=True):
        per_user[user_id].append((text, label))
    split = int(0.75 * CONFIG.examples_per_user)
    global_model = _naive_bayes([example for examples in per_user.values() for example in examples[:split]])
    global_accuracy = [_accuracy(global_model, examples[split:]) for examples in per_user.values()]
    personal_accuracy = [_accuracy(_naive_bayes(examples[:split]), examples[split:]) for examples in per_user.values()]
    assert sum(personal_accuracy) / len(per_user) > sum(global_accuracy) / len(per_user) + 0.15


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_users", 0, "num_users must be a positive integer"),
        ("examples_per_user", 0, "examples_per_user must be a positive integer"),
        ("num_labels", 1, r"num_labels must be in \[2, 8\]"),
        ("num_labels", 9, r"num_labels must be in \[2, 8\]"),
        ("swap_fraction", 1.5, r"swap_fraction must be in \[0, 1\]"),
        ("label_alpha", 0.0, "label_alpha must be positive"),
    ],
)
def test_config_rejects_bad_values(field: str, value: float, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SyntheticConfig(**{field: value})
