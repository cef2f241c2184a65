"""The math core: the erasure guarantees themselves, on random vectors (no model, no peft)."""

import pytest
import torch

from hf_clip_forget.core import (
    IMAGENET_TEMPLATES,
    EditSpec,
    build_edit_factors,
    ccup_edit,
    compose_edits,
    gram_factor,
    normalize_rows,
    nullspace_edit,
    orthonormal_basis,
    resolve_templates,
)


DIM = 24


def rows(n, seed, dim=DIM):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_imagenet_ensemble_has_80_distinct_templates():
    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert resolve_templates("single") == ["a photo of a {}."]
    assert resolve_templates(None) == list(IMAGENET_TEMPLATES)
    assert resolve_templates("a sketch of a {}.") == ["a sketch of a {}."]


@pytest.mark.parametrize("bad", [[], ["no placeholder"], ["{} and {}"], ["a {}", "a {}"], "unknown-set", [3]])
def test_bad_templates_are_refused(bad):
    with pytest.raises((ValueError, TypeError)):
        resolve_templates(bad)


def test_orthonormal_basis_spans_the_vectors_and_drops_noise():
    vectors = rows(5, 0)
    basis = orthonormal_basis(vectors)
    assert basis.shape == (DIM, 5) and basis.is_contiguous()
    torch.testing.assert_close(basis.T @ basis, torch.eye(5, dtype=torch.float64))
    residual = vectors - (vectors @ basis) @ basis.T
    assert residual.abs().max() < 1e-12
    # a sixth vector inside the span up to 1e-7 noise adds no direction at the default tolerance; max_rank caps it
    inside = torch.cat([vectors, (vectors[:2].sum(0) + 1e-7 * rows(1, 1)[0]).unsqueeze(0)])
    assert orthonormal_basis(inside).shape[1] == 5
    assert orthonormal_basis(inside, rtol=1e-10).shape[1] == 6
    assert orthonormal_basis(vectors, max_rank=2).shape[1] == 2


@pytest.mark.parametrize("alpha", [1.0, 0.75, 0.3, 0.0])
def test_nullspace_scales_the_forget_component_by_one_minus_alpha(alpha):
    forget, others = rows(3, 0), rows(7, 1)
    edit = nullspace_edit(orthonormal_basis(forget), alpha)
    edited = edit.apply(others)
    torch.testing.assert_close(edited @ forget.T, (1 - alpha) * (others @ forget.T), atol=1e-12, rtol=0)
    # directions orthogonal to the forget span are untouched
    orthogonal = others - (others @ orthonormal_basis(forget)) @ orthonormal_basis(forget).T
    torch.testing.assert_close(edit.apply(orthogonal), orthogonal, atol=1e-12, rtol=0)
    torch.testing.assert_close(edit.apply_to_weight(others.T), edit.matrix() @ others.T)


def ccup_objective(m, forget, retain, lam, mu):
    eye = torch.eye(m.shape[0], dtype=m.dtype)
    return ((m - eye) ** 2).sum() + lam * ((m @ forget.T) ** 2).sum() + mu * ((m @ retain.T - retain.T) ** 2).sum()


def test_ccup_is_the_minimiser_and_keeps_retain_directions_within_its_bound():
    forget, retain = normalize_rows(rows(2, 0)), normalize_rows(rows(6, 1))
    lam, mu = 1000.0, 100.0
    factors = build_edit_factors("ccup", forget, retain)
    m = ccup_edit(factors.forget, factors.retain, lam, mu).matrix()
    # first-order optimality of the convex objective: its gradient vanishes at M
    eye = torch.eye(DIM, dtype=torch.float64)
    gradient = (m - eye) + lam * m @ forget.T @ forget + mu * (m @ retain.T - retain.T) @ retain
    assert gradient.abs().max() < 1e-9
    best = ccup_objective(m, forget, retain, lam, mu)
    for seed in range(5):
        assert best < ccup_objective(m + 1e-3 * rows(DIM, 10 + seed).T, forget, retain, lam, mu)
    # stated tolerance: ||M T_r - T_r||_F <= sqrt(lambda / mu) ||T_f||_F, and retain moves far less than forget
    retain_shift = (m @ retain.T - retain.T).norm()
    assert retain_shift <= (lam / mu) ** 0.5 * forget.norm()
    assert (m @ forget.T).norm() < 0.05 * forget.norm()
    nullspace_shift = (nullspace_edit(orthonormal_basis(forget)).matrix() @ retain.T - retain.T).norm()
    assert retain_shift < nullspace_shift


def test_ccup_with_a_huge_retain_weight_keeps_retain_exactly():
    forget, retain = normalize_rows(rows(2, 0)), normalize_rows(rows(4, 1))
    factors = build_edit_factors("ccup", forget, retain)
    m = ccup_edit(factors.forget, factors.retain, 10.0, 1e8).matrix()
    assert (m @ retain.T - retain.T).abs().max() < 1e-5


def test_gram_factor_reproduces_the_gram_matrix():
    vectors = rows(40, 3)  # more vectors than dimensions: the factor has at most DIM columns
    factor = gram_factor(vectors)
    assert factor.shape == (DIM, DIM)
    torch.testing.assert_close(factor @ factor.T, vectors.T @ vectors)


def test_composition_is_the_union_not_a_product_of_projectors():
    cat_dog, dog_bird = rows(2, 0), torch.cat([rows(2, 0)[1:], rows(1, 5)])
    first = EditSpec("a", "nullspace", orthonormal_basis(cat_dog).float())
    second = EditSpec("b", "nullspace", orthonormal_basis(dog_bird).float())
    union = compose_edits([first, second], DIM)
    probe = rows(9, 7)
    all_three = torch.cat([cat_dog, dog_bird])
    assert union.rank == 3  # the shared "dog" direction is not counted twice
    assert (normalize_rows(union.apply(probe)) @ normalize_rows(all_three).T).abs().max() < 1e-6
    # the sequential product P_b P_a lets part of span(a) back in; the union does not
    product = nullspace_edit(second.forget.double()).matrix() @ nullspace_edit(first.forget.double()).matrix()
    assert (normalize_rows(probe @ product.T) @ normalize_rows(cat_dog).T).abs().max() > 1e-3
    # order does not matter
    torch.testing.assert_close(compose_edits([second, first], DIM).matrix(), union.matrix())


def test_stack_with_different_alphas_removes_shared_directions_with_the_strongest():
    shared = rows(1, 0)
    strong = EditSpec("strong", "nullspace", orthonormal_basis(shared), alpha=1.0)
    weak = EditSpec("weak", "nullspace", orthonormal_basis(torch.cat([shared, rows(1, 1)])), alpha=0.5)
    edit = compose_edits([weak, strong], DIM)
    probe = rows(5, 2)
    assert (edit.apply(probe) @ shared.T).abs().max() < 1e-10


def test_mixed_stack_applies_the_nullspace_last():
    forget_null, forget_ccup, retain = rows(1, 0), normalize_rows(rows(1, 1)), normalize_rows(rows(3, 2))
    ccup_factors = build_edit_factors("ccup", forget_ccup, retain)
    specs = [
        EditSpec("n", "nullspace", orthonormal_basis(forget_null)),
        EditSpec("c", "ccup", ccup_factors.forget, ccup_factors.retain, ccup_lambda=1000.0, ccup_mu=100.0),
    ]
    m = compose_edits(specs, DIM).matrix()
    expected = (
        nullspace_edit(orthonormal_basis(forget_null)).matrix()
        @ ccup_edit(ccup_factors.forget, ccup_factors.retain, 1000.0, 100.0).matrix()
    )
    torch.testing.assert_close(m, expected)
    assert (forget_null @ m).abs().max() < 1e-12  # nothing maps into the hard-forgotten direction


def test_text_side_factors_send_forgotten_prompts_into_the_kept_span():
    forget, retain, anchor = rows(2, 0), rows(3, 1), rows(1, 2)
    factors = build_edit_factors("nullspace", forget, retain, anchor)
    m = nullspace_edit(factors.forget).matrix()
    kept = torch.cat([anchor, retain])
    torch.testing.assert_close(kept @ m.T, kept, atol=1e-12, rtol=0)  # anchor and retain untouched
    mapped = forget @ m.T
    kept_basis = orthonormal_basis(kept)
    outside = mapped - (mapped @ kept_basis) @ kept_basis.T
    assert outside.abs().max() < 1e-12 and mapped.norm(dim=1).min() > 0.1  # not collapsed to zero
