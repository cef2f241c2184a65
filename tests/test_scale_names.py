"""Label sets of tens of thousands of names (issue 24): the checks on class lists are correct at that size (they
count in one pass; the timing is measured by scripts, never asserted here)."""

import pytest

from hf_clip_forget.core.domains import plan_domain_edit
from hf_clip_forget.core.text_embeddings import duplicate_names, validate_class_names


NAMES = [f"class {i}" for i in range(20_000)]


def test_duplicates_among_20000_names_are_found_each_once_and_sorted():
    names = [*NAMES, "class 19999", "class 7", "class 7", "class 0"]
    assert duplicate_names(names) == ["class 0", "class 19999", "class 7"]
    with pytest.raises(ValueError, match=r"duplicates \['class 0', 'class 19999', 'class 7'\]"):
        validate_class_names(names)
    assert validate_class_names(NAMES) == NAMES  # 20,000 distinct names pass, in their order


def test_duplicate_retain_names_of_a_domain_edit_are_found_at_20000():
    with pytest.raises(ValueError, match=r"duplicates \['class 3'\]"):
        plan_domain_edit(["dog"], domains=["sketch"], retain_classes=[*NAMES, "class 3"])
