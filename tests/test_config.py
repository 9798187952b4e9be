"""Run configs: recipes read from the package YAML, overrides, conflicting options refused."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

import avel
from avel.config import ConfigError, RunConfig, apply_overrides, recipe, resolve_run_config

from _coredata import small_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return small_folder(tmp_path_factory)


def test_original_presets():
    sup = recipe("original", "supervised")
    assert (sup.optim.name, sup.optim.lr, sup.batch_size, sup.epochs) == ("adam", 1e-3, 64, 300)
    assert (sup.optim.schedule, sup.optim.step_every, sup.optim.gamma) == ("step", 15000, 0.1)
    assert sup.eval_every == 5 and sup.loss == "softmax_mlsm" and sup.shuffle is False
    weak = recipe("original", "weak")
    assert weak.epochs == 250 and weak.task == "weak" and weak.batch_size == 64 and weak.optim.lr == 1e-3
    cml = recipe("original", "cml")
    assert (cml.model, cml.batch_size, cml.epochs, cml.margin) == ("cml", 8, 20, 2.0)
    modern = recipe("modern", "supervised")
    assert modern.loss == "ce" and modern.shuffle and modern.optim.name == "adamw" and modern.optim.schedule == "cosine"
    # Presets are fresh objects: no shared mutable state between runs.
    assert recipe("original").model_kwargs is not recipe("original").model_kwargs
    with pytest.raises(ValueError):
        recipe("ancient")
    with pytest.raises(ValueError):
        recipe("original", "unsupervised")


def test_step_schedule_decays_every_15000_iterations():
    from avel.engine.train import make_optimizer, make_schedule

    cfg = recipe("original")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer([p], cfg)
    sched = make_schedule(opt, cfg, 10**6, 52)
    factor = sched.lr_lambdas[0]
    assert [factor(it) for it in (0, 14999, 15000, 29999, 30000)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    # Applied to the optimizer as the iterations go (a short schedule with the same rule).
    cfg = apply_overrides(cfg, ["optim.step_every=3"])
    opt = make_optimizer([p], cfg)
    sched = make_schedule(opt, cfg, 100, 10)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-3] * 3 + [1e-4] * 3 + [1e-5])


@pytest.mark.parametrize("name", ["original", "modern"])
@pytest.mark.parametrize("task", ["supervised", "weak", "cml"])
def test_yaml_round_trip(tmp_path, name, task):
    cfg = apply_overrides(recipe(name, task), ["data.background=a,b", "seed=3"])
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    assert RunConfig.from_yaml(path) == cfg
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_overrides():
    cfg = apply_overrides(recipe("original"), ["optim.lr=3e-4", "epochs=7", "model=dmrn", "shuffle=true",
                                               "model_kwargs.hidden=32", "margin=1", "data.layout=h5"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.epochs == 7 and cfg.model == "dmrn" and cfg.shuffle is True
    assert cfg.model_kwargs == {"hidden": 32}
    assert cfg.margin == 1.0 and isinstance(cfg.margin, float)
    assert cfg.data.layout == "h5"
    assert recipe("original").optim.lr == 1e-3                       # the preset itself is untouched
    for bad in (["optim.nope=1"], ["epochs=many"], ["optim.lr=fast"], ["lr"]):
        with pytest.raises(ValueError):
            apply_overrides(recipe("original"), bad)


def test_hand_written_yaml_reads_numbers_and_rejects_unknown_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: av\nepochs: 3\noptim:\n  lr: 3e-4\n  schedule: constant\n")
    cfg = RunConfig.from_yaml(path)
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.model == "av" and cfg.epochs == 3
    for text in ("optim:\n  lrr: 0.1\n", "data:\n  roots: x\n", "epoch: 3\n"):
        path.write_text(text)
        with pytest.raises(ValueError, match="unknown config key"):
            RunConfig.from_yaml(path)


def test_cli_config_file_and_set(tmp_path, data_root, cli_train_config):
    """`avel train --config X --set ...`: the config the trainer receives."""
    path = tmp_path / "run.yaml"
    path.write_text(recipe("modern").to_yaml())
    cfg = cli_train_config(["--data-root", str(data_root), "--out", str(tmp_path / "r"), "--config", str(path),
                            "--set", "optim.lr=3e-4", "--set", "model_kwargs.hidden=8", "--epochs", "2",
                            "--set", "model=av"])
    assert cfg.recipe == "modern" and cfg.loss == "ce"
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.epochs == 2 and cfg.model == "av"
    assert cfg.model_kwargs == {"hidden": 8} and cfg.data.root == str(data_root)



def test_recipes_are_package_data_and_model_specific_recipes_win():
    from importlib.resources import files

    names = sorted(p.name for p in files("avel").joinpath("recipes").iterdir() if p.name.endswith(".yaml"))
    assert {"original-supervised.yaml", "modern-weak.yaml", "original-cml.yaml"} <= set(names)
    assert {"original", "modern"} <= set(avel.config.available_recipes())
    # A generic recipe takes any model; the model is recorded.
    assert recipe("modern", "supervised", "dmrn").model == "dmrn"
    # The paper recipes are model-specific: asking without a model, or for another model, is refused.
    with pytest.raises(ConfigError, match="no preset for task 'cml'"):
        recipe("paper", "cml")
    with pytest.raises(ConfigError, match="it exists for .*cmbs"):
        recipe("paper", "supervised")
    with pytest.raises(ConfigError, match="no preset"):
        recipe("paper", "supervised", "av_att")
    assert recipe("paper", "supervised", "cmbs").model == "cmbs"


def test_every_recipe_file_parses_and_is_valid():
    from importlib.resources import files

    for p in files("avel").joinpath("recipes").iterdir():
        if p.name.endswith(".yaml"):
            raw = yaml.safe_load(p.read_text())
            cfg = RunConfig.from_dict(raw, where=p.name)
            stem = p.name[:-5].split("-")
            assert cfg.recipe == stem[0] and cfg.task == stem[1], p.name
            if len(stem) > 2:
                assert cfg.model == "-".join(stem[2:]), p.name
            # Each key a recipe sets is commented in the file (the schema is commented in avel/config.py).
            assert p.read_text().lstrip().startswith("#"), p.name


@pytest.mark.parametrize("bad, match", [
    (["threads=-3"], "threads"), (["eval_every=0"], "eval_every"), (["epochs=0"], "epochs"),
    (["epochs=-2"], "epochs"), (["shuffle=no_way"], "true or false"), (["batch_size=0"], "batch_size"),
    (["data.val_split=test"], "selecting on test"), (["optim.lr=0"], "optim.lr"), (["epochs=2.5"], "whole number"),
    (["epochs=3", "epochs=4"], "twice"), (["optim=3"], "section"), (["loss_weights.x=big"], "number"),
])
def test_bad_overrides_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(recipe("original"), bad)


def test_booleans_parse_strictly():
    assert apply_overrides(recipe("original"), ["shuffle=yes"]).shuffle is True
    assert apply_overrides(recipe("original"), ["shuffle=false"]).shuffle is False


@pytest.mark.parametrize("text, match", [("- a\n- b\n", "mapping"), ("model: [\n", "not YAML"),
                                         ("optim: 3\n", "mapping"), ("epochs: 0\n", "epochs")])
def test_bad_config_files_are_refused(tmp_path, text, match):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_yaml(path)


def test_conflicting_options_are_refused_not_dropped(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(recipe("modern", "weak").to_yaml())
    with pytest.raises(ConfigError, match="--task supervised contradicts"):
        resolve_run_config(config_file=path, task="supervised")
    with pytest.raises(ConfigError, match="--recipe original contradicts"):
        resolve_run_config(config_file=path, recipe_name="original")
    # Agreeing options are fine.
    assert resolve_run_config(config_file=path, task="weak", recipe_name="modern").task == "weak"
    with pytest.raises(ConfigError, match="both set epochs"):
        resolve_run_config(recipe_name="original", epochs=3, overrides=["epochs=4"])
    cfg = resolve_run_config(recipe_name="modern", task="weak", model="dmrn", epochs=3, data_root=tmp_path,
                             overrides=["seed=2"])
    assert (cfg.recipe, cfg.task, cfg.model, cfg.epochs, cfg.seed, cfg.data.root) == \
        ("modern", "weak", "dmrn", 3, 2, str(tmp_path))
