"""Bad input: a clear error that names the problem, and nothing modified."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import BertModel, CLIPModel

from hf_clip_forget import ForgetPeftModel, add_forget_adapter
from hf_clip_forget.testing_utils import tiny_clip, tiny_model, tiny_tokenizer
from hf_clip_forget.tuners.projection_edit import ProjectionEditLayer

from .conftest import assert_same_state, projection_weights, state_snapshot


def untouched(model, snapshot):
    assert_same_state(model, snapshot)
    assert not any(isinstance(m, ProjectionEditLayer) for m in model.modules())


@pytest.mark.parametrize(
    ("classes", "options", "error", "message"),
    [
        ([], {}, ValueError, "empty"),
        (["cat", "cat"], {}, ValueError, "duplicates"),
        (["cat", 3], {}, TypeError, "strings"),
        ("cat", {}, TypeError, "list of class names"),
        (["cat", "  "], {}, ValueError, "blank"),
        (["cat"], {"alpha": 1.5}, ValueError, "alpha"),
        (["cat"], {"alpha": -0.1}, ValueError, "alpha"),
        (["cat"], {"method": "ccup", "ccup_lambda": -1.0}, ValueError, "ccup_lambda"),
        (["cat"], {"method": "ccup", "ccup_mu": -2.0}, ValueError, "ccup_mu"),
        (["cat"], {"method": "gradient-ascent"}, ValueError, "method"),
        (["cat"], {"target": "audio"}, ValueError, "target"),
        (["cat"], {"keep_shared_direction": True}, ValueError, "needs `retain_classes`"),
        (["cat"], {"keep_shared_direction": True, "retain_classes": ["dog"], "target": "text"}, ValueError, "'text'"),
        (["cat"], {"method": "ccup", "retain_classes": ["cat"]}, ValueError, "both forgotten and retained"),
        (["cat"], {"templates": ["a photo"]}, ValueError, "{}"),
        (["cat"], {"text_embeds": torch.full((1, 16), float("nan"))}, ValueError, "NaN"),
        (["cat"], {"text_embeds": torch.ones(1, 7)}, ValueError, "shape"),
        (["cat", "dog"], {"text_embeds": torch.ones(1, 16)}, ValueError, "rows"),
        (["cat"], {"adapter_name": "a.b"}, ValueError, "adapter_name"),
    ],
)
def test_bad_arguments_are_refused_before_anything_changes(classes, options, error, message):
    model = tiny_clip()
    snapshot = state_snapshot(model)
    with pytest.raises(error) as info:
        add_forget_adapter(model, classes, tiny_tokenizer(), show_progress=False, **options)
    assert message in str(info.value)
    untouched(model, snapshot)


def test_a_model_without_projection_layers_is_refused():
    from transformers import BertConfig

    model = BertModel(
        BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    )
    snapshot = state_snapshot(model)
    with pytest.raises(ValueError, match="BertModel is not supported by forget adapters"):
        add_forget_adapter(model, ["cat"], tiny_tokenizer())
    untouched(model, snapshot)


def test_a_tokenizer_of_another_model_is_refused():
    model = tiny_clip(vocab_size=40)  # the tiny tokenizer has more tokens than this text tower embeds
    snapshot = state_snapshot(model)
    with pytest.raises(ValueError, match="tokenizer has .* tokens but the model's text tower embeds only 40"):
        add_forget_adapter(model, ["cat"], tiny_tokenizer(), show_progress=False)
    untouched(model, snapshot)


def test_a_missing_tokenizer_is_explained():
    model = tiny_clip()
    with pytest.raises(ValueError, match="Pass `tokenizer=`"):
        add_forget_adapter(model, ["cat"])


def test_an_existing_adapter_name_is_refused_and_the_stack_is_unchanged(tokenizer):
    model = add_forget_adapter(tiny_clip(), ["cat"], tokenizer, adapter_name="pets", show_progress=False)
    snapshot = state_snapshot(model)
    with pytest.raises(ValueError, match="already exists"):
        model.add_forget_adapter(["dog"], tokenizer=tokenizer, adapter_name="pets", show_progress=False)
    assert_same_state(model, snapshot)
    assert list(model.peft_config) == ["pets"] and model.forgotten_classes == {"pets": ["cat"]}


def test_unmerging_when_nothing_is_merged_is_an_error(tokenizer):
    model = add_forget_adapter(tiny_clip(), ["cat"], tokenizer, show_progress=False)
    with pytest.raises(ValueError, match="nothing to unmerge"):
        model.unmerge_adapter()
    model.merge_adapter()
    model.unmerge_adapter()
    with pytest.raises(ValueError, match="nothing to unmerge"):
        model.unmerge_adapter()


def test_a_broken_adapter_never_leaves_a_half_merged_model(tokenizer):
    model = add_forget_adapter(tiny_clip(), ["cat"], tokenizer, target="both", show_progress=False)
    text_layer = model.base_model.model.text_projection
    broken = text_layer.projection_edit_forget["default"].clone()
    broken[0, 0] = float("nan")
    text_layer.set_factors("default", broken)
    weights = projection_weights(model)
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="NaN"):
        model.merge_and_unload()
    assert all(torch.equal(w, weights[n]) for n, w in projection_weights(model).items())
    assert not any(layer.merged for layer in model.base_model.forget_layers().values())


def test_loading_onto_other_projection_shapes_is_refused(tokenizer, tmp_path):
    add_forget_adapter(tiny_clip(projection_dim=16), ["cat"], tokenizer, show_progress=False).save_pretrained(tmp_path)
    other = tiny_clip(projection_dim=8)
    snapshot = state_snapshot(other)
    with pytest.raises(ValueError, match=r"shape \(out, in\) = \(16, 32\).*\(8, 32\)"):
        ForgetPeftModel.from_pretrained(other, tmp_path)
    untouched(other, snapshot)


def test_loading_without_importing_the_package_says_to_import_it(tokenizer, tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    model = tiny_clip()
    model.save_pretrained(base_dir)
    add_forget_adapter(model, ["cat"], tokenizer, show_progress=False).save_pretrained(adapter_dir)
    assert "import hf_clip_forget" in json.loads((adapter_dir / "adapter_config.json").read_text())["peft_type"]
    script = textwrap.dedent(
        f"""
        import sys
        from peft import PeftModel
        from transformers import CLIPModel
        base = CLIPModel.from_pretrained({str(base_dir)!r})
        try:
            PeftModel.from_pretrained(base, {str(adapter_dir)!r})
        except Exception as error:
            print(type(error).__name__, error)
            sys.exit(3)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "run `import hf_clip_forget` before loading" in result.stdout
    # and with the import, the same call works
    from peft import PeftModel

    assert isinstance(PeftModel.from_pretrained(CLIPModel.from_pretrained(base_dir), adapter_dir), PeftModel)


@pytest.mark.parametrize("class_name", ["OwlViTForObjectDetection", "ClapModel", "Siglip2Model"])
def test_prototypes_are_refused_where_the_image_side_takes_no_pixel_images(class_name, tokenizer):
    """Detectors embed boxes, CLAP audio, SigLIP 2 patches: prototypes cannot be synthesised for them, and the
    request is refused before the model is wrapped (it used to fail deep inside, or ask for an image processor)."""
    model = tiny_model(class_name)
    with pytest.raises(ValueError, match="Visual prototypes are synthesised pixel images"):
        model.add_forget_adapter(["truck"], tokenizer=tokenizer, prototypes=1, show_progress=False)
    assert not any(isinstance(module, ProjectionEditLayer) for module in model.modules())
