"""Registration with peft: idempotent, resolvable by the saved and the in-memory type, without modifying peft."""

import importlib

from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import hf_clip_forget
from hf_clip_forget import ProjectionEditConfig, ProjectionEditModel
from hf_clip_forget.tuners.projection_edit import PEFT_TYPE, PREFIX, SAVED_PEFT_TYPE, register_projection_edit


def test_peft_resolves_both_the_saved_and_the_enum_type():
    assert PEFT_TYPE_TO_CONFIG_MAPPING["PROJECTION_EDIT"] is ProjectionEditConfig
    assert PEFT_TYPE_TO_CONFIG_MAPPING[SAVED_PEFT_TYPE] is ProjectionEditConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] is ProjectionEditModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] == PREFIX == f"{PEFT_TYPE.value.lower()}_"
    assert "PROJECTION_EDIT" not in PeftType.__members__  # peft's own enum is left alone


def test_registration_is_idempotent():
    before = (dict(PEFT_TYPE_TO_CONFIG_MAPPING), dict(PEFT_TYPE_TO_TUNER_MAPPING), dict(PEFT_TYPE_TO_PREFIX_MAPPING))
    register_projection_edit(ProjectionEditConfig, ProjectionEditModel)
    importlib.reload(importlib.import_module("hf_clip_forget.tuners.projection_edit"))
    after = (dict(PEFT_TYPE_TO_CONFIG_MAPPING), dict(PEFT_TYPE_TO_TUNER_MAPPING), dict(PEFT_TYPE_TO_PREFIX_MAPPING))
    assert [len(m) for m in after] == [len(m) for m in before]


def test_config_round_trips_through_json_with_the_enum_type(tmp_path):
    config = ProjectionEditConfig(forgotten_classes=["cat"], rank_pattern={"visual_projection": 1}, alpha=0.5)
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ProjectionEditConfig) and loaded.peft_type is PEFT_TYPE
    assert loaded.alpha == 0.5 and loaded.forgotten_classes == ["cat"] and loaded.inference_mode


def test_model_classes_get_add_forget_adapter():
    from transformers import CLIPModel, VisionTextDualEncoderModel

    assert CLIPModel.add_forget_adapter.__doc__ == hf_clip_forget.add_forget_adapter.__doc__
    assert VisionTextDualEncoderModel.add_forget_adapter is CLIPModel.add_forget_adapter
