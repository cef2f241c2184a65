"""The logit-constrained edit's guarantees (``hf_clip_forget.core.logit_edit``), on random geometry: only the
forgotten classes' logits move, by exactly the drop asked on each forget key, and less on the kept keys as μ grows."""

import pytest
import torch

from hf_clip_forget.core.logit_edit import class_dual_vectors, logit_constrained_edit, logit_drops


DIM, CLASSES = 32, 6
# float64 throughout: the solves of a 32-d problem round at ~1e-13 relative; 1e-9 leaves room for conditioning
TOLERANCE = 1e-9


def unit_rows(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, DIM, generator=generator, dtype=torch.float64), dim=-1)


@pytest.fixture
def geometry():
    generator = torch.Generator().manual_seed(0)
    classifier = unit_rows(CLASSES, generator)
    # forget keys close to class 2 (its "sketch" prompts), kept keys close to class 2 and to the others
    forget = torch.nn.functional.normalize(classifier[2] + 0.6 * unit_rows(4, generator), dim=-1)
    kept = torch.nn.functional.normalize(classifier.repeat(3, 1) + 0.6 * unit_rows(3 * CLASSES, generator), dim=-1)
    return classifier, forget, kept, generator


def test_dual_vectors_are_biorthogonal_to_the_classes(geometry):
    classifier = geometry[0]
    assert torch.allclose(classifier @ class_dual_vectors(classifier), torch.eye(CLASSES, dtype=torch.float64),
                          atol=TOLERANCE)  # fmt: skip


def test_only_the_forgotten_class_logit_moves_for_any_input(geometry):
    classifier, forget, kept, generator = geometry
    edit = logit_constrained_edit(classifier, {2: forget}, kept, mu=10.0, margin=0.1)
    inputs = unit_rows(50, generator)
    change = (edit.apply(inputs) - inputs) @ classifier.T
    others = [c for c in range(CLASSES) if c != 2]
    assert change[:, others].abs().max() < TOLERANCE
    assert change[:, 2].abs().max() > 1e-3  # while the forgotten class's logit does move
    assert edit.rank == 1  # one forgotten class: rank 1, whatever the number of keys


def test_on_every_forget_key_the_class_falls_exactly_margin_below_the_best_other(geometry):
    classifier, forget, kept, _ = geometry
    margin = 0.1
    drops = logit_drops(classifier, 2, forget, margin)
    assert (drops > 0).all()  # the class wins on its own forget keys before the edit
    edit = logit_constrained_edit(classifier, {2: forget}, kept, mu=10.0, margin=margin)
    logits = edit.apply(forget) @ classifier.T
    best_other = torch.cat([logits[:, :2], logits[:, 3:]], dim=1).max(dim=1).values
    assert torch.allclose(logits[:, 2], best_other - margin, atol=TOLERANCE)


def test_the_kept_keys_move_less_as_mu_grows_within_the_stated_bound(geometry):
    classifier, forget, kept, _ = geometry
    drops = logit_drops(classifier, 2, forget, 0.1)
    moved = []
    for mu in (0.1, 1.0, 10.0, 100.0):
        edit = logit_constrained_edit(classifier, {2: forget}, kept, mu=mu, margin=0.1)
        detector = edit.right[:, 0]
        kept_change = kept @ detector  # the class's logit change on each kept key, negated
        inverse = torch.linalg.inv(torch.eye(DIM, dtype=torch.float64) + mu * kept.T @ kept)
        bound = drops @ torch.linalg.solve(forget @ inverse @ forget.T, drops)  # δᵀ (F A⁻¹ Fᵀ)⁻¹ δ
        assert mu * kept_change.square().sum() <= bound * (1 + TOLERANCE)
        moved.append(kept_change.abs().mean().item())
    assert moved == sorted(moved, reverse=True) and moved[-1] < moved[0] / 5


def test_several_classes_each_get_their_own_rank_one_term(geometry):
    classifier, forget, kept, generator = geometry
    forget_4 = torch.nn.functional.normalize(classifier[4] + 0.6 * unit_rows(3, generator), dim=-1)
    edit = logit_constrained_edit(classifier, {2: forget, 4: forget_4}, kept, mu=10.0, margin=0.0)
    assert edit.rank == 2
    for k, keys in ((2, forget), (4, forget_4)):
        logits = edit.apply(keys) @ classifier.T
        others = [c for c in range(CLASSES) if c != k]
        assert (logits[:, k] <= logits[:, others].max(dim=1).values + TOLERANCE).all()


def test_a_class_already_below_gets_no_edit(geometry):
    classifier, _, kept, generator = geometry
    elsewhere = classifier[0:1]  # a key that class 0 wins: nothing to lower for class 2 at margin 0
    assert logit_drops(classifier, 2, elsewhere, 0.0).item() == 0.0
    edit = logit_constrained_edit(classifier, {2: elsewhere}, kept, mu=1.0, margin=0.0)
    inputs = unit_rows(10, generator)
    assert torch.allclose(edit.apply(inputs), inputs, atol=TOLERANCE)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"forget_keys": {}}, "empty"),
        ({"forget_keys": {9: None}}, "indexes classes"),
        ({"mu": -1.0}, "mu"),
        ({"margin": float("nan")}, "margin"),
    ],
)
def test_bad_requests_are_refused(geometry, change, message):
    classifier, forget, kept, _ = geometry
    arguments = {"forget_keys": {2: forget}, "mu": 1.0, "margin": 0.1, **change}
    with pytest.raises(ValueError, match=message):
        logit_constrained_edit(classifier, arguments.pop("forget_keys"), kept, **arguments)


def test_dependent_class_directions_are_refused(geometry):
    classifier = geometry[0]
    with pytest.raises(ValueError, match="linearly dependent"):
        class_dual_vectors(torch.cat([classifier, classifier[:1]]))
