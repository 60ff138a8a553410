"""Recipes: built-ins load, every key is checked, overrides and inheritance work."""

from __future__ import annotations

import pytest

from megabatch import recipe as recipes
from megabatch.errors import UserError

BUILTINS = recipes.builtin_names()


def test_the_required_builtins_exist():
    assert {"paper-resnet50-imagenet-32k", "goyal-resnet50-imagenet-8k", "fashion-mnist-baseline",
            "fashion-mnist-paper", "fashion-mnist-demo"} <= set(BUILTINS)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_loads_validates_and_round_trips_through_toml(name, tmp_path):
    recipe = recipes.load(name)
    assert recipe.description and "\n" not in recipe.description
    assert recipe.batch.global_batch % recipe.batch.per_worker_batch == 0
    path = tmp_path / "resolved.toml"
    path.write_text(recipes.to_toml(recipe))
    again = recipes.load(str(path))
    assert recipes.to_dict(again) | {"name": ""} == recipes.to_dict(recipe) | {"name": ""}
    assert recipes.to_dict(recipes.from_dict(recipes.to_dict(recipe))) == recipes.to_dict(recipe)


def test_paper_recipe_is_the_papers_setting():
    r = recipes.load("paper-resnet50-imagenet-32k")
    assert (r.batch.global_batch, r.batch.global_batch // r.batch.per_worker_batch, r.batch.per_worker_batch) == (32768, 1024, 32)
    assert r.base_lr == pytest.approx(12.8)
    assert (r.optimizer.name, r.model.bn, r.train.epochs) == ("rmsprop_warmup", "last_batch", 90)
    assert (r.optimizer.momentum, r.optimizer.rms_decay, r.optimizer.eps, r.optimizer.rmsprop_lr) == (0.9, 0.99, 1e-8, 3e-4)
    assert (r.optimizer.alpha_center, r.optimizer.alpha_period) == (10.0, 5.0)
    assert r.train.comm_dtype == "fp16"
    assert r.schedule.boundaries == [40.0, 70.0, 85.0]
    assert r.schedule.factors == [0.5, 0.075, 0.01, 0.001]


def test_demo_uses_all_algorithmic_techniques_at_a_large_batch():
    r = recipes.load("fashion-mnist-demo")
    assert r.batch.global_batch >= 2048 and r.batch.per_worker_batch == 32
    assert r.optimizer.name == "rmsprop_warmup" and r.model.bn == "last_batch"
    assert r.schedule.warmup_epochs == 0 and r.schedule.factors[0] == 0.5


def test_overrides_are_typed():
    r = recipes.load("fashion-mnist-demo", ["batch.global_batch=4096", "optimizer.lr_per_256=0.2",
                                            "model.arch=small-cnn", "schedule.factors=[1, 0.1]",
                                            "schedule.boundaries=[3]", "data.augment=true"])
    assert (r.batch.global_batch, r.batch.global_batch // r.batch.per_worker_batch, r.optimizer.lr_per_256) == (4096, 128, 0.2)
    assert r.base_lr == pytest.approx(3.2)
    assert r.schedule.factors == [1.0, 0.1] and isinstance(r.schedule.boundaries[0], float)
    assert r.data.augment is True


@pytest.mark.parametrize("override, message", [
    (["optimizer.lr=0.1"], "unknown recipe key optimizer.lr;"),
    (["nonsense.x=1"], "unknown recipe key nonsense"),
    (["batch.global_batch=1.5"], "recipe key batch.global_batch must be int"),
    (["batch.global_batch=true"], "recipe key batch.global_batch must be int"),
    (["optimizer.momentum=fast"], "recipe key optimizer.momentum must be float"),
    (["schedule.factors=[1, 'a']"], "schedule.factors[1] must be float"),
    (["model.bn=sync"], "model.bn = 'sync' is not one of"),
    (["batch.global_batch=2000"], "not divisible by batch.per_worker_batch"),
    (["batch.micro_batch=48"], "micro_batch = 48 is not a multiple of"),
    (["schedule.factors=[1.0]"], "schedule.factors needs 4 values"),
    (["optimizer.lr_per_256"], "must look like section.key=value"),
    (["train.compile_mode=fast"], "train.compile_mode = 'fast' is not one of"),
    (["train.compile_mode=reduce-overhead"], "has no effect without train.compile = true"),
])
def test_bad_recipe_values_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(UserError) as info:
        recipes.load("fashion-mnist-demo", override)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_recipe_lists_the_builtins():
    with pytest.raises(UserError, match="unknown recipe 'nope'.*fashion-mnist-demo"):
        recipes.load("nope")


def test_file_with_base_extends_a_builtin(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('base = "fashion-mnist-demo"\ndescription = "mine"\n[batch]\nglobal_batch = 4096\n')
    r = recipes.load(str(path))
    assert r.description == "mine" and r.batch.global_batch == 4096
    assert r.optimizer.name == "rmsprop_warmup"  # inherited


def test_invalid_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[batch\n")
    with pytest.raises(UserError, match="is not valid TOML"):
        recipes.load(str(bad))
    with pytest.raises(UserError, match="does not exist"):
        recipes.load(str(tmp_path / "missing.toml"))
