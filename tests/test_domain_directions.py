"""The domain-direction AUC (issue 22): does a model's text know an image's domain?"""

import pytest
import torch

from hf_clip_forget.evaluation.domain_directions import binary_auc, domain_direction_auc, domain_text_directions


def test_binary_auc_is_the_mann_whitney_statistic():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    positive = torch.tensor([False, False, True, True])
    # pairs (positive, negative): (0.35, 0.1) ✓, (0.35, 0.4) ✗, (0.8, 0.1) ✓, (0.8, 0.4) ✓ → 3 of 4
    assert binary_auc(scores, positive) == pytest.approx(0.75)
    assert binary_auc(torch.ones(4), positive) == pytest.approx(0.5)  # ties count half
    assert binary_auc(-scores, positive) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="both kinds"):
        binary_auc(scores, torch.ones(4, dtype=torch.bool))


def test_a_text_that_knows_the_domain_separates_its_images_and_one_that_does_not_cannot():
    generator = torch.Generator().manual_seed(0)
    domains, classes, dim = 3, 5, 32
    style = torch.randn(domains, dim, generator=generator)  # what makes a sketch a sketch
    content = torch.randn(classes, dim, generator=generator)
    image_domains = torch.arange(domains).repeat_interleave(40)
    image_classes = torch.randint(classes, (len(image_domains),), generator=generator)
    images = (
        style[image_domains] + content[image_classes] + 0.5 * torch.randn(len(image_domains), dim, generator=generator)
    )
    aware = style[:, None, :] + content[None, :, :]  # text that names the domain where the images show it
    blind = content[None, :, :].expand(domains, classes, dim)  # text that ignores the domain
    assert min(domain_direction_auc(images, image_domains, aware)) > 0.95
    assert domain_text_directions(blind).abs().max() < 1e-12  # a domain-blind text has no domain direction
