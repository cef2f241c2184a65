"""Domain-aware forgetting and visual prototypes on tiny random models: mechanics (effectiveness: docs/domains.md)."""

import pytest
import torch
from transformers import CLIPImageProcessorPil

from hf_clip_forget import ForgetPeftModel, add_forget_adapter
from hf_clip_forget.core import (
    DOMAIN_TEMPLATES,
    DomainCell,
    class_text_embeddings,
    domain_templates,
    plan_domain_edit,
    synthesize_prototypes,
)
from hf_clip_forget.testing_utils import tiny_clip

from .conftest import image_features, projection_weights


PROCESSOR = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
FAST = {"steps": 3, "batch_size": 8}


# ------------------------------------------------------------------------------------------------ the three plans
def test_global_forgets_every_cell_of_the_class_and_keeps_the_others_everywhere():
    plan = plan_domain_edit(["dog"], domains=["sketch", "photo"], retain_classes=["cat"], paradigm="global")
    assert plan.paradigm == "global"
    assert plan.forget == (DomainCell("dog"), DomainCell("dog", "sketch"), DomainCell("dog", "photo"))
    assert plan.retain == (DomainCell("cat"), DomainCell("cat", "sketch"), DomainCell("cat", "photo"))


def test_domain_forgets_the_class_only_in_its_domains_and_keeps_it_elsewhere():
    plan = plan_domain_edit(["dog"], domains=["sketch"], retain_domains=["photo", "cartoon"], retain_classes=["cat"])
    assert plan.paradigm == "domain"  # the default once domains are named
    assert plan.forget == (DomainCell("dog", "sketch"),)
    kept = {str(cell) for cell in plan.retain}
    assert {"dog", "photo/dog", "cartoon/dog"} <= kept  # the same class elsewhere
    assert {"cat", "sketch/cat", "photo/cat", "cartoon/cat"} <= kept  # other classes everywhere, sketch included
    assert "sketch/dog" not in kept


def test_complete_does_not_protect_the_class_in_other_domains():
    plan = plan_domain_edit(
        ["dog"], domains=["sketch"], retain_domains=["photo"], retain_classes=["cat"], paradigm="complete"
    )
    assert plan.forget == (DomainCell("dog", "sketch"),)
    assert all(cell.class_name == "cat" for cell in plan.retain)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"domains": ["sketch"]}, "retain_domains"),
        ({"paradigm": "complete"}, "pass `domains`"),
        ({"domains": ["sketch"], "retain_domains": ["sketch"]}, "both forgotten and retained"),
        ({"paradigm": "everywhere"}, "paradigm"),
        ({"domains": "sketch"}, "list of names"),
    ],
)
def test_bad_domain_plans_are_refused(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        plan_domain_edit(["dog"], **options)


def test_domain_templates_are_built_in_for_pacs_overridable_and_generic_otherwise():
    assert domain_templates("sketch") == list(DOMAIN_TEMPLATES["sketch"])
    assert domain_templates("quickdraw") == [
        "a quickdraw of a {}.",
        "a quickdraw of the {}.",
        "a quickdraw image of a {}.",
    ]
    assert domain_templates("sketch", {"sketch": ["a doodle of a {}."]}) == ["a doodle of a {}."]
    with pytest.raises(ValueError, match="exactly one"):
        domain_templates("sketch", {"sketch": ["a doodle"]})


# ------------------------------------------------------------------------------------------------- prototypes
def _targets(model, tokenizer, classes=("cat", "dog")):
    return class_text_embeddings(model, tokenizer, list(classes), ["a photo of a {}."], show_progress=False).embeddings


def test_prototypes_move_towards_their_targets_and_are_reproducible(tokenizer):
    model = tiny_clip()
    targets = _targets(model, tokenizer)
    options = {"per_target": 2, "image_size": 32, "show_progress": False, "batch_size": 8}
    start = synthesize_prototypes(model, targets, steps=1, learning_rate=1e-9, **options)  # ≈ the initial images
    found = synthesize_prototypes(model, targets, steps=40, **options)
    assert found.targets.tolist() == [0, 0, 1, 1] and found.pixels.shape == (4, 3, 32, 32)
    assert found.similarity.mean() > start.similarity.mean() + 0.1
    again = synthesize_prototypes(model, targets, steps=40, **options)
    assert torch.equal(found.features, again.features) and torch.equal(found.pixels, again.pixels)
    # the stored pre-projection features reproduce the stored embeddings through visual_projection
    projected = torch.nn.functional.normalize(model.visual_projection(found.features).double(), dim=-1)
    torch.testing.assert_close(projected, found.embeddings, atol=1e-5, rtol=0)
    assert found.pixels.min() >= 0 and found.pixels.max() <= 1


def test_prototype_synthesis_leaves_the_model_as_it_was(tokenizer):
    model = tiny_clip().train()
    model.text_projection.requires_grad_(False)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    synthesize_prototypes(model, _targets(model, tokenizer), steps=3, image_size=32, show_progress=False)
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert model.training and not model.visual_projection._forward_pre_hooks


# ----------------------------------------------------------------------------------------------- through the API
def test_a_domain_edit_with_prototypes_records_what_it_did_and_round_trips(tokenizer, pixels, tmp_path):
    model = add_forget_adapter(
        tiny_clip(),
        ["dog"],
        tokenizer,
        domains=["sketch"],
        retain_domains=["photo", "cartoon"],
        retain_classes=["cat", "ship"],
        prototypes=2,
        prototype_options=FAST,
        image_processor=PROCESSOR,
        show_progress=False,
    )
    config = model.peft_config["default"]
    assert (config.paradigm, config.method, config.domains, config.retain_domains) == (
        "domain",
        "ccup",
        ["sketch"],
        ["photo", "cartoon"],
    )
    assert (
        config.prototypes == 2
        and config.prototype_options == FAST
        and set(config.domain_templates)
        == {
            "sketch",
            "photo",
            "cartoon",
        }
    )
    assert config.rank_pattern == {"visual_projection": 3}  # 1 text direction + 2 prototypes
    expected = image_features(model, pixels)
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "only in sketch (domain)" in card and "2 per forget cell" in card and "photo, cartoon" in card
    reloaded = ForgetPeftModel.from_pretrained(tiny_clip(), tmp_path)
    assert torch.equal(image_features(reloaded, pixels), expected)
    assert reloaded.peft_config["default"].domains == ["sketch"]


def test_a_domain_edit_keeps_the_class_in_kept_domains_within_the_ccup_bound(tokenizer):
    base = tiny_clip()

    def cell(domain):
        return class_text_embeddings(base, tokenizer, ["dog"], list(DOMAIN_TEMPLATES[domain]), show_progress=False)

    sketch, photo = cell("sketch").embeddings, cell("photo").embeddings
    lam, mu = 1000.0, 100.0
    model = add_forget_adapter(
        base, ["dog"], tokenizer, domains=["sketch"], retain_domains=["photo"], ccup_lambda=lam, ccup_mu=mu,
        keep_shared_direction=False, show_progress=False,
    )  # fmt: skip
    m = model.base_model.model.visual_projection.combined_edit(["default"]).matrix().double().T  # text-space M
    kept_shift = (m @ photo.T - photo.T).norm()
    assert kept_shift <= (lam / mu) ** 0.5 * sketch.norm()
    assert (m @ sketch.T).norm() < (m @ photo.T).norm()  # the sketch cell is pushed down more than the photo one


def test_the_cli_forgets_in_a_domain(tmp_path):
    import json

    from hf_clip_forget.cli import main
    from hf_clip_forget.testing_utils import tiny_tokenizer

    path = tmp_path / "model"
    tiny_clip().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    PROCESSOR.save_pretrained(path)
    args = ["forget", str(path), "--classes", "dog", "--domains", "sketch", "--retain-domains", "photo,cartoon"]
    args += ["--prototypes", "1", "--prototype-steps", "2", "--templates", "single", "--output", str(tmp_path / "a")]
    assert main(args) == 0
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["paradigm"], config["domains"], config["prototypes"]) == ("domain", ["sketch"], 1)
    assert config["prototype_options"] == {"steps": 2, "seed": 0}


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"domains": ["sketch"]}, ValueError, "retain_domains"),
        ({"domains": ["sketch"], "retain_domains": ["photo"], "target": "text"}, ValueError, "image side"),
        ({"prototypes": -1}, ValueError, "prototypes"),
        ({"prototypes": 1, "prototype_options": {"stepz": 3}}, ValueError, "stepz"),
        ({"domains": ["sketch"], "retain_domains": ["photo"], "text_embeds": torch.ones(1, 16)}, ValueError, "names"),
        ({"domains": ["sk{etch"], "retain_domains": ["photo"]}, ValueError, "braces"),
    ],
)
def test_bad_domain_options_are_refused_before_anything_changes(tokenizer, options, error, message):
    model = tiny_clip()
    before = projection_weights(model)
    with pytest.raises(error, match=message):
        add_forget_adapter(model, ["dog"], tokenizer, image_processor=PROCESSOR, show_progress=False, **options)
    assert all(torch.equal(w, before[name]) for name, w in projection_weights(model).items())
    assert not hasattr(model, "peft_config")
