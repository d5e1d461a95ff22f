"""Near-duplicate search: normalisation, exact Jaccard verification, LSH recall and determinism."""

from __future__ import annotations

import random

import pytest

from tuneloop.data.near_duplicates import exact_key, jaccard, normalise, shingles, similarity_graph

pytestmark = pytest.mark.unit


def test_normalise_ignores_case_punctuation_width_and_spacing():
    assert (
        normalise("  Ｉ was CHARGED—twice!!  ") == normalise("i was charged twice") == "i was charged twice"
    )
    assert exact_key("  a   b\n") == "a b"


def test_graph_groups_same_normalised_texts_and_links_near_ones():
    texts = [
        "Why was I charged twice for the March invoice?",
        "why was i charged TWICE for the march invoice",
        "Search returns nothing for tasks created in the last hour.",
        "Search returns nothing for the tasks created in the last hour.",
        "How do I invite my team?",
    ]
    graph = similarity_graph(texts)
    assert graph.group_of[0] == graph.group_of[1]
    assert [(g, h) for g, h, _ in graph.edges] == [(graph.group_of[2], graph.group_of[3])]
    assert graph.edges[0][2] >= 0.8
    components = graph.components()
    assert components[0] == components[1] and components[2] == components[3]
    assert len(set(components)) == 3


def _random_text(rng: random.Random) -> str:
    words = [
        "card",
        "refund",
        "account",
        "transfer",
        "pending",
        "top",
        "up",
        "fee",
        "charged",
        "why",
        "my",
        "is",
        "the",
        "app",
        "cash",
        "atm",
        "limit",
        "blocked",
        "pin",
        "exchange",
        "rate",
        "verify",
        "identity",
    ]
    return " ".join(rng.choice(words) for _ in range(rng.randint(6, 14)))


def test_lsh_finds_every_pair_a_brute_force_search_finds():
    rng = random.Random(3)
    texts = [_random_text(rng) for _ in range(300)]
    for index in range(0, 300, 10):  # plant near-copies: one word swapped or appended
        words = texts[index].split()
        texts.append(" ".join(words + ["please"]))
    graph = similarity_graph(texts, 0.7)
    reps = [graph.members[g][0] for g in range(len(graph.members))]
    sets = [shingles(normalise(texts[r])) for r in reps]
    brute = {
        (g, h) for g in range(len(sets)) for h in range(g + 1, len(sets)) if jaccard(sets[g], sets[h]) >= 0.7
    }
    assert len(brute) >= 30
    assert {(g, h) for g, h, _ in graph.edges} == brute


def test_same_input_same_answer_every_run():
    rng = random.Random(5)
    texts = [_random_text(rng) for _ in range(200)]
    assert similarity_graph(texts, 0.6) == similarity_graph(list(texts), 0.6)
