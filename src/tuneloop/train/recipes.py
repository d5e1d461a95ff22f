"""The recipe registry (``method:`` in the config): which training recipe a run uses.

Recipes are imported on first use, so naming one never loads another's dependencies.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    module: str

    def load(self) -> Callable[..., Any]:
        return importlib.import_module(self.module).run


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe("sft", "Supervised fine-tuning: loss on the assistant answers only.", "tuneloop.train.sft"),
        Recipe(
            "dpo",
            "Direct preference optimisation on prompt/chosen/rejected pairs; reference = base, adapter off.",
            "tuneloop.train.dpo",
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(RECIPES))}") from None
