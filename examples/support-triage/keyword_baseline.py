"""How far do keywords get on this dataset? Two non-LLM baselines, for honesty about its difficulty.

1. A hand-written keyword router, the way help desks often start: each queue has trigger words; the queue
   with the most hits wins (ties and no hits go to the most common queue of the training split).
2. TF-IDF + logistic regression trained on train.csv: the strongest cheap bag-of-words model.

Run: python examples/support-triage/keyword_baseline.py   (prints one JSON line)
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

HERE = Path(__file__).parent

KEYWORDS = {
    "billing": ["invoice", "charge", "charged", "refund", "payment", "card", "vat", "receipt", "price", "plan",
                "subscription", "upgrade", "downgrade", "cancel", "billing", "discount", "seat", "renewal"],
    "enterprise_escalation": ["contract", "sla", "enterprise", "account manager", "csm", "legal", "executive",
                              "cio", "cfo", "escalat", "outage", "procurement", "dpa", "security review", "renew"],
    "account_access": ["login", "log in", "password", "2fa", "mfa", "locked", "sign in", "reset", "sso",
                       "access", "authenticator", "account"],
    "integration": ["slack", "jira", "github", "gitlab", "salesforce", "hubspot", "zapier", "webhook", "api",
                    "token", "sync", "integration", "teams", "outlook", "calendar", "scim", "okta", "oauth"],
    "bug_report": ["bug", "error", "crash", "broken", "blank", "doesn't work", "not working", "glitch", "freeze",
                   "spinner", "wrong", "fails", "500"],
    "onboarding": ["how do i", "how to", "set up", "setup", "invite", "import", "template", "getting started",
                   "new to", "trial", "tutorial", "training", "best way"],
}


def read(name: str) -> list[tuple[str, str]]:
    with (HERE / name).open(encoding="utf-8", newline="") as handle:
        return [(row["text"], row["label"]) for row in csv.DictReader(handle)]


def keyword_router(text: str, fallback: str) -> str:
    lowered = text.lower()
    hits = {queue: sum(len(re.findall(re.escape(word), lowered)) for word in words) for queue, words in KEYWORDS.items()}
    best = max(hits.values())
    winners = [queue for queue, count in hits.items() if count == best]
    return winners[0] if best > 0 and len(winners) == 1 else fallback


def main() -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline

    train, test = read("train.csv"), read("test.csv")
    fallback = Counter(label for _, label in train).most_common(1)[0][0]
    truth = [label for _, label in test]
    keyword = [keyword_router(text, fallback) for text, _ in test]
    bag = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LogisticRegression(max_iter=2000))
    bag.fit([t for t, _ in train], [l for _, l in train])
    tfidf = list(bag.predict([t for t, _ in test]))
    result = {
        "test_rows": len(test),
        "keyword_router": {"accuracy": round(accuracy_score(truth, keyword), 3), "macro_f1": round(f1_score(truth, keyword, average="macro"), 3)},
        "tfidf_logreg": {"accuracy": round(accuracy_score(truth, tfidf), 3), "macro_f1": round(f1_score(truth, tfidf, average="macro"), 3)},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
