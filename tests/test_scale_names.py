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


def test_averaging_one_template_is_the_rows_themselves_and_several_their_normalised_mean():
    import torch

    from hf_clip_forget.core import average_templates, normalize_rows

    rows = normalize_rows(torch.randn(50, 3, 8, dtype=torch.float64).reshape(-1, 8)).reshape(50, 3, 8)
    assert torch.equal(average_templates(rows), normalize_rows(rows.mean(dim=1)))
    one = rows[:, :1]
    assert torch.equal(average_templates(one), one[:, 0])
    # what it skips: renormalising the mean of one unit row, which only rounds it (float64, d = 8)
    assert torch.allclose(normalize_rows(one.mean(dim=1)), one[:, 0], rtol=0, atol=1e-15)
