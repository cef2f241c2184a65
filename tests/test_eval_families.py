"""The evaluation harness on every supported image family, on real images (a few PACS images, tiny random models).

The harness embeds the images once and projects the cached features with each version of the model
(hf_clip_forget.evaluation.representation). For every family the projections must equal the family's own image
embeddings of the same processor outputs — unedited, with a forget adapter active, with two active, with adapters
disabled or edits bypassed, merged where mergeable — and the reports must be the accuracies of those embeddings.
The models are random, so only exactness is asserted, never an accuracy level.
"""

import pytest
import torch

from hf_clip_forget.core import class_text_embeddings, image_side_embeddings
from hf_clip_forget.evaluation import (
    ImageFeatures,
    class_embeddings,
    embed_images,
    evaluate_edit,
    evaluate_zero_shot,
    find_visual_projection,
    image_features_key,
    image_representation,
    load_labelled_images,
    project_image_features,
    vision_tower_fingerprint,
    zero_shot_logits,
)
from hf_clip_forget.families import FAMILIES, family_of_class
from hf_clip_forget.testing_utils import tiny_image_processor, tiny_model, tiny_pixel_inputs, tiny_tokenizer

from .real_data import PACS_TEST, needs_pacs


CLASSES = ("dog", "elephant", "guitar", "house")  # two images of each
FORGET = ["dog"]
# The class name is the prompt's largest token id: OWL-ViT pools text there with the tiny tokenizer, so with "a photo
# of a {}." every class would share one embedding ("photo" sorts after all of them).
TEMPLATES = ["a {}."]

#: Image–text families whose image side is classified zero-shot: all but detectors and audio models.
IMAGE_FAMILIES = [
    name for family in FAMILIES if family.inputs == "image" and not family.detector for name in family.model_classes
]
every_image_family = pytest.mark.parametrize("class_name", IMAGE_FAMILIES)

pytestmark = needs_pacs


@pytest.fixture(scope="module")
def images():
    """Eight PACS test images, two of each of :data:`CLASSES`; two are cropped to 2:1 and 1:3 (PACS images are
    square) so that SigLIP 2's patch grids differ per image and its padding mask matters."""
    dataset = load_labelled_images(PACS_TEST, split="test")
    names = dataset.features["label"].names
    wanted = {names.index(name): 2 for name in CLASSES}
    indices = []
    for index, label in enumerate(dataset["label"]):
        if wanted.get(label, 0):
            wanted[label] -= 1
            indices.append(index)
        if len(indices) == 2 * len(CLASSES):
            break
    crops = {1: lambda w, h: (0, 0, w, h // 2), 2: lambda w, h: (0, 0, w // 3, h)}

    def crop(row, position):
        box = crops.get(position)
        return {"image": row["image"].crop(box(*row["image"].size)) if box else row["image"]}

    return dataset.select(indices).map(crop, with_indices=True)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def processor_for(class_name: str):
    """An image processor producing the inputs the tiny model takes: 32×32 pixels, or for a family taking pre-cut
    patches (SigLIP 2) its own processor sized like :func:`tiny_pixel_inputs` (patch size, patches per image)."""
    example = tiny_pixel_inputs(class_name, batch_size=1)
    if set(example) == {"pixel_values"}:
        assert example["pixel_values"].shape[1:] == (3, 32, 32)
        return tiny_image_processor()
    import transformers

    assert "spatial_shapes" in example, f"no processor for the tiny {class_name}'s inputs {sorted(example)}"
    max_patches, patch_dim = example["pixel_values"].shape[1:]
    patch_size = int((patch_dim // 3) ** 0.5)
    # the PIL backend needs no torchvision
    return transformers.Siglip2ImageProcessorPil(patch_size=patch_size, max_num_patches=max_patches)


def processor_outputs(processor, dataset) -> dict[str, torch.Tensor]:
    return dict(processor(images=[image.convert("RGB") for image in dataset["image"]], return_tensors="pt"))


def own_embeddings(model, inputs) -> torch.Tensor:
    """The family's image embeddings of ``model`` as it is now, from the processor's outputs: the reference."""
    with torch.no_grad():
        return image_side_embeddings(model, **inputs).float()


def assert_equal_embeddings(actual, expected) -> None:
    """Equal within 1e-5 of the embeddings' scale (the tiny ALIGN's are ~1e-9 in size, the others ~1)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def assert_differ(first, second) -> None:
    """The edit visibly changed the embeddings (so an edit applied nowhere fails the equalities above)."""
    assert (first - second).abs().max() > 1e-3 * second.abs().max()


def forget(model, tokenizer, classes=FORGET, **options):
    return model.add_forget_adapter(classes, tokenizer=tokenizer, templates=TEMPLATES, show_progress=False, **options)


# ------------------------------------------------------------------------------------------------- embeddings
@every_image_family
def test_cached_features_project_to_the_familys_own_image_embeddings_in_every_state(class_name, images, tokenizer):
    model = tiny_model(class_name)
    processor = processor_for(class_name)
    inputs = processor_outputs(processor, images)
    unedited = own_embeddings(model, inputs)
    features = embed_images(model, images, processor, batch_size=3, show_progress=False)
    side = family_of_class(class_name).image

    # what is cached: the Linear's input (at its token), or the unedited embedding itself for an output edit
    assert features.representation == image_representation(model)
    width = find_visual_projection(model).in_features if side.mergeable else unedited.shape[1]
    assert features.features.shape == (len(images), width)
    if not side.mergeable:
        assert_equal_embeddings(features.features, unedited)
    assert_equal_embeddings(project_image_features(model, features), unedited)

    peft = forget(model, tokenizer)
    edited = own_embeddings(peft, inputs)
    assert_differ(edited, unedited)
    assert_equal_embeddings(project_image_features(peft, features), edited)
    with peft.disable_adapter():
        assert_equal_embeddings(project_image_features(peft, features), own_embeddings(peft, inputs))
        assert_equal_embeddings(project_image_features(peft, features), unedited)
    with peft.base_model.edits_bypassed():
        assert_equal_embeddings(project_image_features(peft, features), unedited)
    # the features of the edited model are the same: they are taken before the edit, or with it bypassed
    again = embed_images(peft, images, processor, batch_size=8, show_progress=False)
    assert_equal_embeddings(again.features, features.features)

    # two active adapters: their union
    peft.add_forget_adapter(
        ["guitar"], tokenizer=tokenizer, templates=TEMPLATES, adapter_name="more", show_progress=False
    )
    peft.base_model.set_adapter(["default", "more"])
    both = own_embeddings(peft, inputs)
    assert_differ(both, edited)
    assert_equal_embeddings(project_image_features(peft, features), both)
    if side.mergeable:
        peft.merge_adapter()
        assert_equal_embeddings(project_image_features(peft, features), own_embeddings(peft, inputs))
        assert_equal_embeddings(project_image_features(peft, features), both)
        with peft.base_model.edits_bypassed():
            assert_equal_embeddings(project_image_features(peft, features), unedited)


@every_image_family
def test_every_image_input_the_family_takes_is_passed_on(class_name, images):
    """Each processor output besides the pixels that the family takes changes its embeddings (SigLIP 2's mask and
    patch grid), so the equalities above fail if the harness dropped one."""
    model = tiny_model(class_name)
    inputs = processor_outputs(processor_for(class_name), images)
    expected = own_embeddings(model, inputs)
    for key in sorted(set(inputs) - {"pixel_values"}):
        reduced = {name: value for name, value in inputs.items() if name != key}
        try:
            without = own_embeddings(model, reduced)
        except Exception:  # noqa: BLE001 - refusing to run without it is as good as differing
            continue
        assert_differ(without, expected)


def test_features_of_another_representation_are_refused(images):
    clip, siglip = tiny_model("CLIPModel"), tiny_model("SiglipModel")
    features = embed_images(siglip, images, processor_for("SiglipModel"), show_progress=False)
    assert features.features.shape[1] == clip.visual_projection.in_features  # same width: only the kind differs
    with pytest.raises(ValueError, match=r"unedited embedding \(output of vision_model.head\).*input of visual_proj"):
        project_image_features(clip, features)


def test_the_representation_is_saved_with_the_features(images, tmp_path):
    model = tiny_model("SiglipModel")
    features = embed_images(model, images, processor_for("SiglipModel"), show_progress=False)
    features.save(tmp_path / "features.safetensors")
    loaded = ImageFeatures.load(tmp_path / "features.safetensors")
    assert loaded.representation == "unedited embedding (output of vision_model.head)"
    assert torch.equal(loaded.features, features.features)


# ------------------------------------------------------------------------------------------------------ the key
def test_the_cache_key_follows_what_the_cached_features_depend_on(images, tokenizer, monkeypatch):
    processor = tiny_image_processor()

    def key(model):
        return image_features_key(model, processor, images)

    # a mergeable projection is applied at projection time: changing (or merging) it keeps the entry
    clip = tiny_model("CLIPModel")
    before = key(clip)
    peft = forget(clip, tokenizer)
    assert key(peft) == before
    peft.merge_adapter()
    assert key(peft) == before
    # SigLIP caches its head's output: the head is part of the key, its forget adapter is not
    siglip = tiny_model("SiglipModel")
    before = key(siglip)
    assert key(forget(tiny_model("SiglipModel"), tokenizer)) == before
    with torch.no_grad():
        siglip.vision_model.head.probe.add_(1.0)
    assert key(siglip) != before
    # GroupViT caches the input of visual_projection.3, the output of visual_projection.0-2
    groupvit = tiny_model("GroupViTModel")
    before = vision_tower_fingerprint(groupvit)
    with torch.no_grad():
        groupvit.visual_projection[3].weight.add_(1.0)
    assert vision_tower_fingerprint(groupvit) == before
    with torch.no_grad():
        groupvit.visual_projection[0].weight.add_(1.0)
    assert vision_tower_fingerprint(groupvit) != before
    # the representation is part of the key itself
    import hf_clip_forget.evaluation.cache as cache

    clip_key = key(clip)
    monkeypatch.setattr(cache, "image_representation", lambda model: "another representation")
    assert key(clip) != clip_key


# ------------------------------------------------------------------------------------------------ the reports
def direct_accuracies(model, tokenizer, inputs, labels, class_names):
    """Per-class accuracy and forget-class cosines from the family's own embeddings, without the harness."""
    image = torch.nn.functional.normalize(own_embeddings(model, inputs), dim=-1)
    with torch.no_grad():
        text = class_text_embeddings(model, tokenizer, class_names, TEMPLATES, show_progress=False).embeddings
    logits = image @ text.float().T
    predictions = logits.argmax(dim=-1)
    per_class = {
        name: (predictions[labels == i] == i).float().mean().item()
        for i, name in enumerate(class_names)
        if (labels == i).any()
    }
    return per_class, logits


@every_image_family
def test_reports_are_the_accuracies_of_the_familys_own_embeddings(class_name, images, tokenizer):
    model = tiny_model(class_name)
    processor = processor_for(class_name)
    inputs = processor_outputs(processor, images)
    labels = torch.tensor(images["label"])
    class_names = tuple(images.features["label"].names)
    peft = forget(model, tokenizer)
    options = dict(tokenizer=tokenizer, image_processor=processor, templates=TEMPLATES, show_progress=False)

    report = evaluate_edit(peft, images, **options)
    with peft.disable_adapter():
        before, _ = direct_accuracies(peft, tokenizer, inputs, labels, class_names)
    after, logits = direct_accuracies(peft, tokenizer, inputs, labels, class_names)
    assert report.before.per_class == pytest.approx(before) and report.after.per_class == pytest.approx(after)
    assert evaluate_zero_shot(peft, images, FORGET, **options).per_class == pytest.approx(after)

    # the harness's own logits are those of the family's embeddings, and the edit's guarantee holds in them: a zero
    # cosine with the forgotten class for every image, so its images are no longer recognised wherever another
    # class scores above zero (on a random model, which images those are is chance)
    features = embed_images(peft, images, processor, show_progress=False)
    text = class_embeddings(peft, tokenizer, class_names, TEMPLATES, show_progress=False)
    harness = zero_shot_logits(project_image_features(peft, features), text)
    torch.testing.assert_close(harness, logits, rtol=0, atol=1e-5)
    forgotten = class_names.index(FORGET[0])
    assert harness[:, forgotten].abs().max() <= 1e-5
    competing = harness.max(dim=-1).values > 1e-4
    assert not ((harness.argmax(dim=-1) == forgotten) & competing).any()
    assert report.after.forget_accuracy == pytest.approx(after[FORGET[0]])
