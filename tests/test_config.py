"""Experiment config: typed sections, overrides, errors that name the key; DeepSpeed JSON and
the LR schedule built from it."""
import json

import pytest

from pipeline.models import model_entry
import torch
import yaml

import tests.helpers_train  # noqa: F401  (registers the toy model)
from pipeline.config import (ConfigError, ExperimentConfig, from_dict, load_config, save_config,
                             shipped_configs)
from pipeline.train.optim import WarmupCosine, build_ds_config, build_scheduler, param_groups
from tests.helpers_train import ToyConfig, ToyModel, toy_config_dict


def write(tmp_path, data, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def toy_yaml(tmp_path):
    return write(tmp_path, toy_config_dict(str(tmp_path / "run"), str(tmp_path / "shards")))


def test_loads_typed_sections_and_model_union(toy_yaml):
    cfg = load_config(toy_yaml)
    assert isinstance(cfg, ExperimentConfig)
    assert isinstance(cfg.model, ToyConfig) and cfg.model.patch_size == 8
    assert cfg.data.batch_size == 4 and cfg.train.precision == "fp32"
    assert cfg.optim.weight_decay == 0.02  # default kept


def test_overrides_dotted_keys_lists_and_yaml_scalars(toy_yaml):
    cfg = load_config(toy_yaml, ["optim.lr=3e-4", "data.crop_scale=[0.6, 1.0]", "model.dim=32",
                                 "train.run_dir=/x/y", "data.train_weights=[1, 2.5]", "eval.every=5"])
    assert cfg.optim.lr == pytest.approx(3e-4)  # PyYAML reads 3e-4 as a string; float fields accept it
    assert cfg.data.crop_scale == [0.6, 1.0]
    assert cfg.model.dim == 32 and cfg.train.run_dir == "/x/y" and cfg.eval.every == 5
    assert cfg.data.train_weights == [1.0, 2.5]


@pytest.mark.parametrize("override, key", [
    ("model.dimm=3", "model.dimm"),
    ("train.run_dirr=x", "train.run_dirr"),
    ("trian.seed=1", "trian"),
    ("optim.betas.x=1", "optim.betas"),
])
def test_unknown_keys_are_errors_naming_the_key(toy_yaml, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(toy_yaml, [override])
    assert str(err.value).startswith(key + ":")


@pytest.mark.parametrize("override, key, words", [
    ("data.batch_size=abc", "data.batch_size", "int"),
    ("data.batch_size=2.5", "data.batch_size", "int"),
    ("data.resampled=3", "data.resampled", "bool"),
    ("train.precision=fp8", "train.precision", "one of"),
    ("optim.lr=fast", "optim.lr", "float"),
    ("data.crop_scale=0.5", "data.crop_scale", "list"),
    ("data.crop_scale=[0.5, x]", "data.crop_scale[1]", "float"),
    ("model.keep_ratio=[1]", "model.keep_ratio", "float"),
    ("data=3", "data", "mapping"),
])
def test_wrong_types_are_errors_naming_the_key(toy_yaml, override, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(toy_yaml, [override])
    msg = str(err.value)
    assert msg.startswith(key + ":") and words in msg


def test_unknown_model_name_lists_the_registered_ones(toy_yaml):
    with pytest.raises(ConfigError, match=r"model\.name: unknown model 'nope'.*toy"):
        load_config(toy_yaml, ["model.name=nope"])


def test_missing_model_and_bad_override_syntax(tmp_path, toy_yaml):
    with pytest.raises(ConfigError, match="^model:"):
        from_dict({"data": {}})
    with pytest.raises(ConfigError, match="key=value"):
        load_config(toy_yaml, ["optim.lr"])
    with pytest.raises(ConfigError, match="no shipped config"):
        load_config("no_such_config_name")


def test_resolved_config_round_trips(tmp_path, toy_yaml):
    cfg = load_config(toy_yaml, ["optim.lr=0.5", "data.crop_scale=[0.7, 1.0]"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg


def test_shipped_configs_type_check():
    names = shipped_configs()
    assert "tiny_albef_elip" in names and "albef_elip" in names
    for name in names:  # every shipped config parses into its model's registered dataclass
        cfg = load_config(name)
        assert type(cfg.model) is model_entry(cfg.model.name).config_cls, name
    paper = load_config("albef_elip")
    assert paper.data.image_size == 256 and paper.optim.weight_decay == 0.02
    assert (paper.optim.lr, paper.optim.min_lr, paper.optim.epochs) == (1e-4, 1e-5, 20)
    with pytest.raises(ConfigError, match=r"^model\.vision\.reduction\.metod:"):
        load_config("tiny_albef_elip", ["model.vision.reduction.metod=tome"])


@pytest.mark.parametrize("overrides, key", [
    (["model.vision.reduction.lam=1.5"], "model.vision.reduction.lam"),
    (["model.vision.reduction.method=dynamicvit"], "model.vision.reduction.method"),
    (["model.vision.reduction.elip_mode=later"], "model.vision.reduction.elip_mode"),
    (["model.vision.reduction.layers=[1, 9]"], "model.vision.reduction.layers[1]"),  # a 4-layer ViT
    (["model.vision.reduction.ratios=[0.5]"], "model.vision.reduction.ratios"),  # two layers, one ratio
    (["model.text.prune.strategy=top"], "model.text.prune.strategy"),
    (["model.text.prune.strategy=post", "model.text.prune.ratio=1.5"], "model.text.prune.ratio"),
    (["model.text.prune.strategy=learned"], "model.text.prune.strategy"),  # with ELIP: they guide each other
    (["data.image_size=96"], "data.image_size"),
    (["model.vision.model_name=no_such_vit"], "model.vision.model_name"),
])
def test_model_values_are_checked_when_the_config_loads(overrides, key):
    """What the model would refuse while it is built is refused by load_config already."""
    with pytest.raises(ConfigError) as err:
        load_config("tiny_albef_elip", overrides)
    assert str(err.value).startswith(key), str(err.value)


def test_cli_exits_2_naming_a_model_value_before_any_rank_starts(capsys, monkeypatch):
    from pipeline.train import loop
    from pipeline.train.__main__ import main

    monkeypatch.setattr(loop, "train", lambda cfg: pytest.fail("training started"))
    assert main(["--config", "tiny_albef_elip", "model.vision.reduction.lam=2"]) == 2
    assert capsys.readouterr().err.startswith("config error: model.vision.reduction.lam=2")


def test_cli_reports_config_errors_without_starting(toy_yaml, capsys):
    from pipeline.train.__main__ import main

    assert main(["--config", str(toy_yaml), "train.bogus=1"]) == 2
    assert "train.bogus: unknown key" in capsys.readouterr().err


# --------------------------------------------------------------------------- DeepSpeed JSON, optimizer


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload"])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_ds_configs_are_filled_from_the_experiment(toy_yaml, name, precision):
    cfg = load_config(toy_yaml, [f"train.deepspeed={name}", f"train.precision={precision}", "train.grad_accum=3",
                                 "train.grad_clip=1.5", "data.batch_size=7"])
    ds = build_ds_config(cfg, world_size=2)
    assert "auto" not in json.dumps(ds)
    assert ds["train_micro_batch_size_per_gpu"] == 7 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 42 and ds["gradient_clipping"] == 1.5
    assert ds["bf16"]["enabled"] == (precision == "bf16") and ds["fp16"]["enabled"] == (precision == "fp16")
    assert ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling when fp16 is on
    assert ds["zero_optimization"]["stage"] == (1 if name == "zero1" else 2 if name == "zero2" else 3)
    # DeepSpeed's own (pydantic) validation of the ZeRO and precision blocks accepts them
    from deepspeed.runtime.precision_config import get_bfloat16_config, get_float16_config
    from deepspeed.runtime.zero.config import get_zero_config

    zero = get_zero_config(ds)
    assert zero.stage == ds["zero_optimization"]["stage"]
    assert (zero.offload_optimizer is not None and zero.offload_optimizer.device == "cpu") == (name == "zero3_offload")
    assert get_bfloat16_config(ds).enabled == (precision == "bf16")
    assert get_float16_config(ds).enabled == (precision == "fp16")


def test_unknown_ds_config_is_an_error(toy_yaml):
    cfg = load_config(toy_yaml, ["train.deepspeed=zero9"])
    with pytest.raises(ConfigError, match="^train.deepspeed:.*zero2"):
        build_ds_config(cfg, world_size=1)


def test_warmup_cosine_schedule():
    s = WarmupCosine(lr=1e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=10, total_steps=110)
    assert s.lr_at(0) == pytest.approx(1e-6)
    assert s.lr_at(5) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    assert s.lr_at(10) == pytest.approx(1e-4)
    assert s.lr_at(60) == pytest.approx((1e-4 + 1e-5) / 2)
    assert s.lr_at(110) == pytest.approx(1e-5) and s.lr_at(500) == pytest.approx(1e-5)
    lrs = [s.lr_at(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_scheduler_uses_warmup_fraction_and_rejects_both(toy_yaml):
    model = ToyModel(ToyConfig())
    opt = torch.optim.AdamW(param_groups(model, 0.02), lr=1e-2)
    cfg = load_config(toy_yaml, ["optim.warmup_steps=0", "optim.warmup_fraction=0.5"])
    sched = build_scheduler(opt, cfg, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-2) and lrs.index(max(lrs)) == 5
    with pytest.raises(ConfigError, match="^optim.warmup_fraction:"):
        build_scheduler(opt, load_config(toy_yaml, ["optim.warmup_fraction=0.1"]), total_steps=10)


def test_param_groups_skip_decay_for_bias_norm_and_frozen():
    model = ToyModel(ToyConfig())
    decay, no_decay = param_groups(model, 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} == {"patch.weight", "proj.weight", "text.weight"}
    assert {names[id(p)] for p in no_decay["params"]} == {"patch.bias", "norm.weight", "norm.bias", "proj.bias",
                                                          "logit_scale"}
    # frozen parameters are in neither group
    assert not any(names[id(p)].startswith("frozen") for g in (decay, no_decay) for p in g["params"])
