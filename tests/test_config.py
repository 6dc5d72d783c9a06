import subprocess
import sys

import pytest

from cerberus_histo.config import IMAGENET_NORM, PRESETS, InputNorm, ModelConfig
from cerberus_histo.errors import ConfigError
from cerberus_histo.tasks import GLAND, LUMEN, NUCLEI, TASKS, TISSUE, HeadSpec, TaskSpec, get_task


def test_builtin_tasks_match_the_paper():
    assert GLAND.class_names == ("nolabel", "gland", "surface-epi") and GLAND.inst_kernel == 11
    assert GLAND.kinds == ("inst", "type") and LUMEN.kinds == ("inst",) and LUMEN.inst_kernel == 3
    assert NUCLEI.class_names == ("nolabel", "neutrophil", "epithelial", "lymphocyte", "plasma", "eosinophil",
                                  "connective")
    assert NUCLEI.inst_kernel == 3 and NUCLEI.kinds == ("inst", "type")
    assert TISSUE.class_names == ("background", "abnormal_epi", "normal_epi", "inflammatory", "muscle", "stroma",
                                  "debris", "mucous", "adipose")
    assert TISSUE.kinds == ("class",)
    # loss weights of the original paramset.yml (nuclei type weight 0 there was a bug)
    assert GLAND.head("inst").loss_weight == 1.4 and LUMEN.head("inst").loss_weight == 1.5
    assert TISSUE.head("class").loss_weight == 0.4 and NUCLEI.head("type").loss_weight == 1.0
    assert NUCLEI.head("type").dice_weight == 1.0 and NUCLEI.class_weights[1] == 12.0
    for t in TASKS.values():
        assert len(t.class_colors) == len(t.class_names)


def test_original_preset_has_six_heads():
    cfg = ModelConfig.preset("original")
    assert cfg.head_names == ("gland-inst", "gland-type", "lumen-inst", "nuclei-inst", "nuclei-type", "tissue-class")
    assert cfg.encoder == "resnet34" and cfg.stem_stride == 1 and cfg.norm == InputNorm()
    assert cfg.patch_shape == 448 and cfg.class_patch_shape == 144 and cfg.mpp == 0.5
    task, head = cfg.head("nuclei-type")
    assert task is NUCLEI and head.kind == "type"
    assert cfg.task("gland").num_outputs("type") == 3 and cfg.task("gland").num_outputs("inst") == 3


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_round_trip(name):
    cfg = ModelConfig.preset(name, encoder="tiny", norm=IMAGENET_NORM, class_pool_cells=None)
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("kwargs, words", [
    ({"stem_stride": 4}, "stem_stride"),
    ({"mpp": 0}, "mpp"),
    ({"class_dropout": 1.5}, "class_dropout"),
    ({"tasks": ()}, "tasks"),
    ({"tasks": (GLAND, GLAND)}, "unique"),
])
def test_model_config_validation(kwargs, words):
    base = {"tasks": (GLAND,)}
    base.update(kwargs)
    with pytest.raises(ConfigError, match=words):
        ModelConfig(**base)


def test_unknown_keys_are_named():
    d = ModelConfig.preset("nuclei").to_dict()
    d["encoderr"] = "resnet34"
    with pytest.raises(ConfigError, match="encoderr"):
        ModelConfig.from_dict(d)
    d = ModelConfig.preset("nuclei").to_dict()
    d["norm"]["divisor"] = "two hundred"
    with pytest.raises(ConfigError, match="norm"):
        ModelConfig.from_dict(d)
    d = ModelConfig.preset("nuclei").to_dict()
    d["tasks"][0]["kernel"] = 3
    with pytest.raises(ConfigError, match="kernel"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("change, words", [
    ({"inst_kernel": 4}, "inst_kernel"),
    ({"class_colors": ((0, 0, 0),)}, "class_colors"),
    ({"class_names": ("a",)}, "class_names"),
    ({"heads": (HeadSpec("inst"), HeadSpec("inst"))}, "unique"),
    ({"heads": (HeadSpec("inst"), HeadSpec("class"))}, "class"),
    ({"class_weights": (1.0,)}, "class_weights"),
    ({"name": "Gland!"}, "task name"),
])
def test_task_validation(change, words):
    import dataclasses

    with pytest.raises(ConfigError, match=words):
        dataclasses.replace(GLAND, **change)


def test_head_spec_validation():
    with pytest.raises(ConfigError, match="kind"):
        HeadSpec("semantic")
    with pytest.raises(ConfigError, match="loss_weight"):
        HeadSpec("inst", loss_weight=-1)


def test_custom_task_and_subsets():
    signet = TaskSpec("signet", ("nolabel", "signet"), ((0, 0, 0), (255, 0, 0)), (HeadSpec("inst"),), inst_kernel=5)
    cfg = ModelConfig(tasks=(signet, GLAND.with_heads("inst")))
    assert cfg.head_names == ("signet-inst", "gland-inst")
    with pytest.raises(ConfigError, match="preset"):
        ModelConfig.preset("everything")
    with pytest.raises(ConfigError, match="built-in tasks"):
        get_task("mitosis")
    with pytest.raises(ConfigError, match="cannot keep"):
        LUMEN.with_heads("type")


def test_config_and_tasks_do_not_import_torch():
    code = "import cerberus_histo, cerberus_histo.config, cerberus_histo.tasks, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
