"""The generated reference in docs/reference is complete and current."""
import os

from maskjax import reference
from maskjax.config import base_config


def test_every_config_field_is_described():
    fields = set(reference.flatten(base_config().to_dict()))
    assert fields - set(reference.FIELDS) == set(), "fields without a description in maskjax/reference.py"
    assert set(reference.FIELDS) - fields == set(), "descriptions of fields that no longer exist"


def test_every_recipe_names_its_paper_and_the_paper_keys_exist():
    fields = set(reference.all_fields())
    for paper in reference.papers().values():
        assert set(paper["values"]) <= fields
    pages = reference.pages()
    recipes = sorted(f for f in os.listdir(os.path.join(reference.ROOT, "configs")) if f.endswith(".py"))
    assert sorted(p for p in pages if p.startswith("recipes/")) == [f"recipes/{r[:-3]}.md" for r in recipes]
    assert "0 of 25" in pages["recipes/mae_imagenet.md"] and "**differs**" in pages["recipes/mae_digits.md"]


def test_committed_pages_are_current():
    for name, content in reference.pages().items():
        path = os.path.join(reference.OUT, name)
        assert os.path.isfile(path), f"{path} is missing: run python -m maskjax.reference"
        with open(path) as f:
            assert f.read() == content, f"{path} is stale: run python -m maskjax.reference"
