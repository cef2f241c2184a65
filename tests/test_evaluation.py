"""The zero-shot evaluation harness: data loading, cached features, before/after reports, the evaluate metric.

The tiny models are random, so their accuracies mean nothing; these tests check exact properties of the mechanics
(features, logits, bookkeeping, JSON shape, errors) against direct recomputations.
"""

import copy
import json
import os
import pathlib

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_clip_forget import ForgetEvaluation
from hf_clip_forget.core import class_text_embeddings
from hf_clip_forget.evaluation import (
    FORGETTING_METRIC_PATH,
    ForgettingReport,
    ImageFeatures,
    ZeroShotReport,
    class_embeddings,
    embed_images,
    evaluate_edit,
    evaluate_zero_shot,
    load_forgetting_metric,
    load_labelled_images,
    project_image_features,
    resolve_columns,
    zero_shot_logits,
)

from .conftest import image_features


CLASSES = ["cat", "dog", "bird", "horse", "ship"]
DOMAINS = ["photo", "sketch"]
FORGET = ["cat", "dog"]
NUM_IMAGES = 30
TEMPLATES = ["a photo of a {}.", "a sketch of the {}."]
SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def random_images(n: int, seed: int = 0, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)) for _ in range(n)]


def labelled_dataset(n: int = NUM_IMAGES, with_domain: bool = True) -> datasets.Dataset:
    columns = {"image": random_images(n), "label": [i % len(CLASSES) for i in range(n)]}
    features = {"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)}
    if with_domain:
        columns["domain"] = [(i // len(CLASSES)) % len(DOMAINS) for i in range(n)]
        features["domain"] = datasets.ClassLabel(names=DOMAINS)
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


@pytest.fixture(scope="module")
def dataset():
    return labelled_dataset()


@pytest.fixture(scope="module")
def processor():
    import transformers

    # the PIL backend needs no torchvision (CLIPImageProcessor falls back to it with a warning)
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    return processor_cls(size={"shortest_edge": 32}, crop_size=32)


@pytest.fixture(scope="module")
def pixels_of(processor):
    def pixels(ds: datasets.Dataset) -> torch.Tensor:
        return processor(images=list(ds["image"]), return_tensors="pt")["pixel_values"]

    return pixels


def forget_model(make_model, tokenizer, classes=FORGET, **options):
    options = {"templates": TEMPLATES, "show_progress": False, **options}
    return make_model().add_forget_adapter(classes, tokenizer=tokenizer, **options)


def direct_predictions(model, tokenizer, pixel_values) -> torch.Tensor:
    """Zero-shot predictions computed without the harness: get_image_features and the core text embeddings."""
    images = torch.nn.functional.normalize(image_features(model, pixel_values).float(), dim=-1)
    with torch.no_grad():
        text = class_text_embeddings(model, tokenizer, CLASSES, TEMPLATES, show_progress=False).embeddings.float()
    return (images @ text.T).argmax(dim=-1)


def expected_report(predictions: torch.Tensor, ds: datasets.Dataset) -> dict:
    labels, domains = list(ds["label"]), list(ds["domain"])
    correct = [int(p) == y for p, y in zip(predictions.tolist(), labels, strict=True)]

    def mean(mask):
        hits = [c for c, m in zip(correct, mask, strict=True) if m]
        return sum(hits) / len(hits)

    forget = [CLASSES[y] in FORGET for y in labels]
    return {
        "accuracy": sum(correct) / len(correct),
        "forget_accuracy": mean(forget),
        "retain_accuracy": mean([not f for f in forget]),
        "per_class": {c: mean([CLASSES[y] == c for y in labels]) for c in CLASSES},
        "per_domain_class": {
            f"{d}/{c}": mean([CLASSES[y] == c and DOMAINS[g] == d for y, g in zip(labels, domains, strict=True)])
            for d in DOMAINS
            for c in CLASSES
        },
    }


# ---------------------------------------------------------------------------------------------------- features
def test_cached_pre_projection_features_reproduce_image_features(make_model, tokenizer, dataset, processor, pixels_of):
    model = make_model()
    pixel_values = pixels_of(dataset)
    features = embed_images(model, dataset, processor, batch_size=7, show_progress=False)
    assert features.features.shape[0] == len(dataset) and features.features.dtype == torch.float32
    assert features.class_names == tuple(CLASSES) and features.domain_names == tuple(DOMAINS)
    assert torch.equal(features.labels, torch.tensor(dataset["label"]))
    assert torch.equal(features.domains, torch.tensor(dataset["domain"]))
    unedited = image_features(model, pixel_values)
    # the cached features come from batches of 7 (and of 64 below), the reference from one batch: the vision tower's
    # float32 sums run in another order, the longest its patch embedding's over 3 × 8 × 8 = 192 inputs, each off by up
    # to about 192 × eps relative to the scale (merging adds the projection's, shorter)
    tol = 192 * torch.finfo(torch.float32).eps * float(unedited.abs().max())
    torch.testing.assert_close(project_image_features(model, features), unedited, rtol=0, atol=tol)

    peft = forget_model(lambda: model, tokenizer, target="both")
    edited = image_features(peft, pixel_values)
    assert not torch.allclose(edited, unedited, atol=1e-4)
    torch.testing.assert_close(project_image_features(peft, features), edited, rtol=0, atol=tol)
    with peft.base_model.edits_bypassed():
        torch.testing.assert_close(project_image_features(peft, features), unedited, rtol=0, atol=tol)
    peft.merge_adapter()
    torch.testing.assert_close(project_image_features(peft, features), edited, rtol=0, atol=tol)
    with peft.base_model.edits_bypassed():
        torch.testing.assert_close(project_image_features(peft, features), unedited, rtol=0, atol=tol)
    # the features of the edited model are the same: the edit is after the vision tower
    again = embed_images(peft, dataset, processor, batch_size=64, show_progress=False)
    torch.testing.assert_close(
        again.features,
        features.features,
        rtol=0,
        atol=192 * torch.finfo(torch.float32).eps * float(features.features.abs().max()),
    )


def test_any_callable_image_processor_and_columns_without_domain(tokenizer, processor):
    from hf_clip_forget.testing_utils import tiny_clip

    ds = labelled_dataset(n=8, with_domain=False).rename_column("image", "img").rename_column("label", "fine_label")
    assert resolve_columns(ds).image == "img" and resolve_columns(ds).label == "fine_label"

    def to_pixels(images):  # a plain callable returning the tensor itself
        return processor(images=images, return_tensors="pt")["pixel_values"]

    features = embed_images(tiny_clip(), ds, to_pixels, batch_size=3, show_progress=False)
    assert len(features) == 8 and features.domains is None and features.domain_names is None


# ----------------------------------------------------------------------------------------------------- reports
@pytest.mark.parametrize("target", ["visual", "both"])
def test_reports_match_a_direct_recomputation(make_model, tokenizer, dataset, processor, pixels_of, target):
    model = forget_model(make_model, tokenizer, target=target)
    pixel_values = pixels_of(dataset)
    edited = image_features(model, pixel_values)
    report = evaluate_edit(
        model, dataset, tokenizer=tokenizer, image_processor=processor, templates=TEMPLATES, show_progress=False
    )
    assert isinstance(report, ForgettingReport)
    before = direct_predictions(make_model(), tokenizer, pixel_values)  # a fresh, identical, unedited model
    after = direct_predictions(model, tokenizer, pixel_values)
    assert not torch.equal(before, after)  # the edit changes some predictions, so both sides are really checked
    for got, predictions in ((report.before, before), (report.after, after)):
        expected = expected_report(predictions, dataset)
        assert got.num_images == NUM_IMAGES and got.forget_classes == tuple(FORGET)
        for key in ("accuracy", "forget_accuracy", "retain_accuracy"):
            assert getattr(got, key) == pytest.approx(expected[key])
        assert got.per_class == pytest.approx(expected["per_class"])
        assert got.per_domain_class == pytest.approx(expected["per_domain_class"])
        n_forget = sum(CLASSES[y] in FORGET for y in dataset["label"])
        assert got.accuracy == pytest.approx(
            (got.forget_accuracy * n_forget + got.retain_accuracy * (NUM_IMAGES - n_forget)) / NUM_IMAGES
        )
    # the model is left as it was, its edits active
    assert torch.equal(image_features(model, pixel_values), edited)


def test_full_nullspace_edit_zeroes_the_forgotten_logits(make_model, tokenizer, dataset, processor):
    model = forget_model(make_model, tokenizer, alpha=1.0)
    features = embed_images(model, dataset, processor, show_progress=False)
    text = class_embeddings(model, tokenizer, CLASSES, TEMPLATES, show_progress=False)  # visual edit: text unchanged
    forgotten = [CLASSES.index(name) for name in FORGET]
    logits = zero_shot_logits(project_image_features(model, features), text)
    assert logits[:, forgotten].abs().max() < 1e-5
    with model.base_model.edits_bypassed():
        before = zero_shot_logits(project_image_features(model, features), text)
    assert before[:, forgotten].abs().max() > 1e-2
    # so a forgotten class can only win an image whose every logit is <= 0
    winners = logits.argmax(dim=-1)
    won = torch.isin(winners, torch.tensor(forgotten))
    assert (logits[won].max(dim=-1).values <= 1e-5).all()
    report = evaluate_edit(model, features, tokenizer=tokenizer, templates=TEMPLATES, show_progress=False)
    forget_images = torch.isin(features.labels, torch.tensor(forgotten))
    hits = (winners == features.labels)[forget_images].float().mean().item()
    assert report.after.forget_accuracy == pytest.approx(hits)


def test_to_dict_has_the_cli_json_shape(make_model, tokenizer, dataset, processor):
    model = forget_model(make_model, tokenizer)
    report = evaluate_edit(
        model, dataset, tokenizer=tokenizer, image_processor=processor, templates="single", show_progress=False
    )
    data = json.loads(json.dumps(report.to_dict()))
    assert set(data) == {"before", "after"}
    for side in data.values():
        assert {"forget_accuracy", "retain_accuracy", "per_class", "per_domain_class"} <= set(side)
        assert set(side["per_class"]) == set(CLASSES)
        assert set(side["per_domain_class"]) == {f"{d}/{c}" for d in DOMAINS for c in CLASSES}
        assert all(0.0 <= v <= 1.0 for v in side["per_class"].values())
    no_domain = evaluate_edit(
        model,
        dataset,
        tokenizer=tokenizer,
        image_processor=processor,
        templates="single",
        domain_column=None,
        show_progress=False,
    ).to_dict()
    assert "per_domain_class" not in no_domain["before"] and "per_domain_class" not in no_domain["after"]
    assert no_domain["after"]["per_class"] == data["after"]["per_class"]

    card = report.to_forget_evaluation("Tiny", dataset_type="user/tiny", split="test")
    assert isinstance(card, ForgetEvaluation)
    assert card.forget_accuracy_after == report.after.forget_accuracy
    assert card.retain_accuracy_before == report.before.retain_accuracy
    assert card.eval_results()[0].metric_value == report.after.forget_accuracy


def test_single_model_report_and_reference_model(tokenizer, dataset, processor):
    from hf_clip_forget.testing_utils import tiny_clip

    report = evaluate_zero_shot(
        tiny_clip(), dataset, tokenizer=tokenizer, image_processor=processor, templates="single", show_progress=False
    )
    assert isinstance(report, ZeroShotReport)
    assert report.forget_accuracy is None and report.retain_accuracy is None and report.forget_classes == ()
    # class_prompts: "dog" prompted as "cat" gets cat's text embedding; argmax ties go to the first class, cat
    renamed = evaluate_zero_shot(
        tiny_clip(),
        dataset,
        tokenizer=tokenizer,
        image_processor=processor,
        templates="single",
        class_prompts={"dog": "cat"},
        show_progress=False,
    )
    assert renamed.per_class["dog"] == 0.0 and renamed.per_class["bird"] == report.per_class["bird"]
    with pytest.raises(ValueError, match=r"`class_prompts` names \['truck'\]"):
        evaluate_zero_shot(
            tiny_clip(), dataset, tokenizer=tokenizer, image_processor=processor, class_prompts={"truck": "car"}
        )

    peft = tiny_clip().add_forget_adapter(FORGET, tokenizer=tokenizer, templates="single", show_progress=False)
    reference = evaluate_edit(
        peft, dataset, tokenizer=tokenizer, image_processor=processor, templates="single", show_progress=False
    )
    assert reference.before.per_class == report.per_class
    merged = copy.deepcopy(peft).merge_and_unload()  # a plain CLIPModel holding the edit in its weights
    separate = evaluate_edit(
        merged,
        dataset,
        FORGET,
        tokenizer=tokenizer,
        image_processor=processor,
        reference_model=tiny_clip(),
        templates="single",
        show_progress=False,
    )
    assert separate.to_dict() == reference.to_dict()
    with pytest.raises(ValueError, match="different vision towers"):
        evaluate_edit(
            merged,
            dataset,
            FORGET,
            tokenizer=tokenizer,
            image_processor=processor,
            reference_model=tiny_clip(seed=1),
            show_progress=False,
        )


def test_image_features_save_load_and_reuse(tmp_path, tokenizer, dataset, processor):
    from hf_clip_forget.testing_utils import tiny_clip

    model = tiny_clip().add_forget_adapter(FORGET, tokenizer=tokenizer, templates="single", show_progress=False)
    features = embed_images(model, dataset, processor, show_progress=False)
    features.save(tmp_path / "features.safetensors")
    loaded = ImageFeatures.load(tmp_path / "features.safetensors")
    assert torch.equal(loaded.features, features.features) and torch.equal(loaded.domains, features.domains)
    assert loaded.class_names == features.class_names and loaded.domain_names == features.domain_names
    from_pixels = evaluate_edit(
        model, dataset, tokenizer=tokenizer, image_processor=processor, templates="single", show_progress=False
    )
    from_cache = evaluate_edit(model, loaded, tokenizer=tokenizer, templates="single", show_progress=False)
    assert from_cache.to_dict() == from_pixels.to_dict()


# ------------------------------------------------------------------------------------------------------ metric
def test_forgetting_metric():
    metric = load_forgetting_metric()
    result = metric.compute(predictions=[0, 1, 1, 2, 3, 3], references=[0, 1, 2, 2, 0, 3], forget_labels=[0, 1])
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["forget_accuracy"] == pytest.approx(2 / 3)  # references 0, 1, 0: right, right, wrong
    assert result["retain_accuracy"] == pytest.approx(2 / 3)  # references 2, 2, 3: wrong, right, right
    assert (result["num_forget"], result["num_retain"]) == (3, 3)
    plain = metric.compute(predictions=[0, 1], references=[0, 0], per_label=True)
    assert plain["accuracy"] == 0.5 and plain["forget_accuracy"] is None and plain["retain_accuracy"] is None
    assert plain["per_label_accuracy"] == {0: 0.5}
    with pytest.raises(ValueError, match="predictions"):
        metric.compute(predictions=[0], references=[0, 1])


def test_forgetting_metric_loads_offline_with_evaluate_load(monkeypatch):
    import socket

    import evaluate
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise OSError("network access while loading the packaged metric")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    script = os.path.join(FORGETTING_METRIC_PATH, "forgetting_accuracy.py")
    for path in (FORGETTING_METRIC_PATH, script):  # the module's directory or its script
        metric = evaluate.load(path, keep_in_memory=True)
        assert metric.name == "forgetting_accuracy"
        assert metric.compute(predictions=[0, 1], references=[0, 0], forget_labels=[0])["forget_accuracy"] == 0.5


# ------------------------------------------------------------------------------------------------------ loading
def test_load_from_parquet_file_directory_and_image_folder(tmp_path, dataset):
    (tmp_path / "parquet").mkdir()
    dataset.to_parquet(str(tmp_path / "parquet" / "test.parquet"))
    dataset.select(range(5)).to_parquet(str(tmp_path / "parquet" / "train.parquet"))
    from_file = load_labelled_images(tmp_path / "parquet" / "test.parquet")
    assert len(from_file) == NUM_IMAGES and from_file.features["label"].names == CLASSES
    assert from_file.features["domain"].names == DOMAINS
    assert len(load_labelled_images(tmp_path / "parquet", split="test")) == NUM_IMAGES
    assert len(load_labelled_images(str(tmp_path / "parquet"), split="train")) == 5

    datasets.DatasetDict({"test": dataset, "train": dataset.select(range(3))}).save_to_disk(str(tmp_path / "saved"))
    assert len(load_labelled_images(tmp_path / "saved", split="train")) == 3

    for i, image in enumerate(random_images(6)):
        folder = tmp_path / "folder" / ["apple", "boat"][i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i}.png")
    folder_set = load_labelled_images(tmp_path / "folder")  # no splits: the whole folder
    assert len(folder_set) == 6 and folder_set.features["label"].names == ["apple", "boat"]
    columns = resolve_columns(folder_set)
    assert (columns.image, columns.label, columns.domain) == ("image", "label", None)


@pytest.mark.skipif(not (SHARED_DATA / "pacs" / "test.parquet").exists(), reason="no real data in ../shared/data")
def test_load_pacs_test_split():
    pacs = load_labelled_images(SHARED_DATA / "pacs" / "test.parquet")
    assert len(pacs) == 2001
    assert len(pacs.features["label"].names) == 7 and len(pacs.features["domain"].names) == 4
    assert resolve_columns(pacs).domain == "domain"


# --------------------------------------------------------------------------------------------------- bad input
def test_bad_datasets_are_refused_clearly(tmp_path, dataset):
    with pytest.raises(ValueError, match="No such file or directory"):
        load_labelled_images(tmp_path / "missing" / "test.parquet")
    with pytest.raises(ValueError, match="not a local file or directory, and loading it as a Hub dataset"):
        load_labelled_images("nobody/no-such-dataset")  # the session's loopback Hub has no such dataset
    with pytest.raises(ValueError, match="no image column.*'label'.*cast_column"):
        resolve_columns(dataset.remove_columns("image"))
    strings = dataset.cast_column("label", datasets.Value("int64"))
    with pytest.raises(ValueError, match="no label column of type ClassLabel.*'image'.*class_encode_column"):
        resolve_columns(strings)
    with pytest.raises(ValueError, match="not a ClassLabel column"):
        resolve_columns(dataset, label_column="image")
    with pytest.raises(ValueError, match="empty"):
        embed_images(None, dataset.select([]), lambda images: None)
    with pytest.raises(TypeError, match="DatasetDict"):
        resolve_columns(datasets.DatasetDict({"test": dataset}))
    dataset.select(range(0)).to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(ValueError, match="empty"):
        load_labelled_images(tmp_path / "empty.parquet")


def test_bad_evaluation_arguments_are_refused_clearly(tokenizer, dataset, processor):
    from hf_clip_forget.testing_utils import tiny_clip

    peft = tiny_clip().add_forget_adapter(
        ["cat", "truck"], tokenizer=tokenizer, templates="single", show_progress=False
    )
    features = embed_images(peft, dataset, processor, show_progress=False)
    options = dict(tokenizer=tokenizer, templates="single", show_progress=False)
    with pytest.raises(ValueError, match=r"\['truck'\] are not classes of the dataset.*\['cat', 'dog'"):
        evaluate_edit(peft, features, ["cat", "truck"], **options)
    with pytest.raises(ValueError, match=r"active adapters forget \['truck'\].*forget_classes="):
        evaluate_edit(peft, features, **options)
    with pytest.raises(ValueError, match="holds no forget adapter.*reference_model"):
        evaluate_edit(tiny_clip(), features, ["cat"], **options)
    no_cats = ImageFeatures(features.features[1:5], torch.tensor([1, 2, 3, 4]), features.class_names)
    with pytest.raises(ValueError, match=r"no images of the forget classes \['cat'\]"):
        evaluate_edit(peft, no_cats, ["cat"], **options)
    with pytest.raises(ValueError, match="empty"):
        evaluate_zero_shot(peft, ImageFeatures(features.features[:0], features.labels[:0], tuple(CLASSES)), **options)
    with pytest.raises(TypeError, match="callable"):
        embed_images(peft, dataset, "not a processor")
    hidden = dataset.map(lambda row, i: {"label": -1 if i == 3 else row["label"]}, with_indices=True)
    with pytest.raises(ValueError, match=r"1 of 30 images have no label.*dataset.filter"):
        embed_images(peft, hidden, processor)
    report = evaluate_edit(peft, features, ["cat"], **options)
    all_forgotten = ImageFeatures(features.features[:1], features.labels[:1], features.class_names)
    with pytest.raises(ValueError, match="undefined"):
        evaluate_edit(peft, all_forgotten, ["cat"], **options).to_forget_evaluation("tiny")
    assert report.after.retain_accuracy is not None
