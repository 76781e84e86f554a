"""Sweep files (shipped ones load, bad ones are refused naming file and key), the budget search,
and the synthetic source's unmentioned distractors."""
import json

import pytest

from data_prep import synthetic
from pipeline.compare.match import match_budget, search
from pipeline.compare.sweep import load_sweep, shipped_sweeps
from pipeline.config import ConfigError, load_config
from tests.helpers_train import save_checkpoint


def test_shipped_sweeps_load_and_their_variants_resolve():
    assert {"tiny_albef_reductions", "tiny_albef_demo", "albef_reductions", "blip_reductions", "meter_reductions",
            "evlgen_connectors", "tiny_evlgen_connectors"} <= set(shipped_sweeps())
    for name in shipped_sweeps():
        sweep = load_sweep(name)
        assert sweep.baseline in sweep.variants
        for variant in sweep.variants.values():  # every override is a key the config knows
            load_config(sweep.base, [*sweep.overrides, *variant.overrides])
    tiny = load_sweep("tiny_albef_reductions")
    assert list(tiny.variants) == ["none", "elip-lookahead", "elip-reuse", "elip-plus", "tome", "evit", "flip",
                                   "evit-constant", "adaptive", "teacher-same"]
    assert all(tiny.variants[v].match == "token_layers" for v in ("flip", "evit-constant", "adaptive"))
    assert tiny.variants["tome"].match == "token_layers" and tiny.variants["tome"].reference == "elip-reuse"
    assert tiny.seeds == [0, 1, 2] and tiny.warm_start.config == "tiny_clip"
    # the CPU demo (launch/compare.sh's default) is the tiny sweep cut down, not another recipe
    demo = load_sweep("tiny_albef_demo")
    assert demo.base == tiny.base and vars(demo.warm_start) == vars(tiny.warm_start) and len(demo.seeds) >= 2
    assert {"none", "elip-reuse", "adaptive"} <= set(demo.variants) and demo.baseline == tiny.baseline
    for name, variant in demo.variants.items():
        assert vars(variant) == vars(tiny.variants[name])


@pytest.mark.parametrize("text, message", [
    ("variants: {a: []}", "base: required key is missing"),
    ("base: tiny_albef_elip\nvariants: {a: [nokey]}", "variants.a: nokey: an override must look like key=value"),
    ("base: tiny_albef_elip\nvariants: {a: {overrides: [], match: speed, reference: a}}", "variants.a.match: expected one of"),
    ("base: tiny_albef_elip\nvariants: {a: {match: flops, reference: b}}", "variants.a.reference: 'b' is not a variant"),
    ("base: tiny_albef_elip\nvariants: {a: []}\nbaseline: z", "baseline: 'z' is not a variant"),
    ("base: tiny_albef_elip\nvariants: {a: []}\nseeds: [0, 0]", "seeds: expected a non-empty list of distinct ints"),
    ("base: nonesuch_config\nvariants: {a: []}", "base: --config: no shipped config 'nonesuch_config'"),
    ("base: tiny_albef_elip\nvariants: {a: []}\nsteps: 3", "steps: unknown key"),
])
def test_bad_sweep_files_are_refused_naming_the_key(tmp_path, text, message):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_search_finds_the_nearest_value_on_either_monotone_direction():
    calls = []

    def tokens_of_r(r):  # decreasing in r, refused above 20
        calls.append(r)
        return None if r > 20 else 300 - 10 * r

    best, got = search(tokens_of_r, list(range(0, 41)), target=193)
    assert (best, got) == (11, 190) and len(calls) < 15  # bisection, not a scan
    best, got = search(lambda k: 100 * k, [round(0.05 * i, 2) for i in range(1, 21)], target=42)
    assert best == 0.4 and got == pytest.approx(40)


def test_match_budget_measures_tome_r_against_the_reference():
    base = ["model.vision.reduction.method=tome"]
    chosen = match_budget("token_layers", load_config("tiny_albef_elip"),
                          lambda more: load_config("tiny_albef_elip", base + more),
                          lambda cfg: {"token_layers": 4 * 65 - 6 * (cfg.model.vision.reduction.r
                                                                     if cfg.model.vision.reduction.method == "tome" else 11)},
                          tolerance=0.05)
    assert chosen["key"] == "model.vision.reduction.r" and chosen["value"] == 11
    assert chosen["within_tolerance"] and chosen["override"] == "model.vision.reduction.r=11"
    with pytest.raises(ConfigError, match="no searched key for reduction.method='elip'"):
        match_budget("flops", load_config("tiny_albef_elip"), lambda more: load_config("tiny_albef_elip", more),
                     lambda cfg: {"flops": 1}, 0.05)


@pytest.mark.parametrize("overrides, key, value", [
    (["model.vision.reduction.method=flip"], "model.vision.reduction.flip_keep", 0.4),
    (["model.vision.reduction.budget_tau=0.9"], "model.vision.reduction.budget_tau", 0.4),  # ELIP + budget: adaptive
])
def test_match_budget_searches_flip_keep_and_the_adaptive_tau(overrides, key, value):
    def measure(cfg):  # budget grows with the knob; the reference (plain ELIP) spends what 0.4 does
        r = cfg.model.vision.reduction
        knob = {"flip": r.flip_keep}.get(r.method, r.budget_tau if r.budget_tau > 0 else 0.4)
        return {"token_layers": 4 * (1 + 64 * knob)}

    chosen = match_budget("token_layers", load_config("tiny_albef_elip"),
                          lambda more: load_config("tiny_albef_elip", overrides + more), measure, tolerance=0.05)
    assert chosen["key"] == key and chosen["value"] == pytest.approx(value)


def test_distractors_are_unmentioned_groups_in_free_quadrants(tmp_path):
    for i in range(30):
        plain, plain_caps, groups = synthetic.make_example(0, i, 64, 5, "test")
        image, caps, same_groups = synthetic.make_example(0, i, 64, 5, "test", distractors=2)
        assert caps == plain_caps and same_groups == groups  # the captions are unchanged ...
        extra = synthetic.compose_distractors(0, i, groups, 2, "test")
        assert len(extra) == min(2, 4 - len(groups))
        assert not {g["position"] for g in extra} & {g["position"] for g in groups}
        if extra:  # ... but the image holds more than they say
            assert image.tobytes() != plain.tobytes()
    m = synthetic.build(tmp_path / "d", num=8, image_size=32, shard_size=8, min_shards=1, distractors=3)
    assert m["num_samples"] == 8
    import webdataset as wds

    sample = next(iter(wds.WebDataset(str(next((tmp_path / "d").glob("*.tar"))))))
    meta = json.loads(sample["json"])
    assert len(meta["distractors"]) == 4 - len(meta["objects"])
    with pytest.raises(Exception, match="--distractors must be in"):
        synthetic.build(tmp_path / "e", num=2, distractors=4)


def test_budgets_are_measured_on_the_runs_start_weights_and_real_images(tmp_path):
    """forward_budget runs the model the variant will train: train.init_from's checkpoint once it
    exists (before, the initialisation, and it says so) on images of data.train_shards; an adaptive
    budget then keeps what the trained attention picks on those images."""
    import torch

    from pipeline.compare.measure import forward_budget, start_weights
    from pipeline.models import build_model

    synthetic.build(tmp_path / "train", num=4, image_size=64, shard_size=4, min_shards=1)
    adaptive = ["model.vision.reduction.budget_tau=0.5", f"data.train_shards={tmp_path / 'train'}",
                f"train.init_from={tmp_path / 'warm'}"]
    before = forward_budget(load_config("tiny_albef_elip", adaptive), device=torch.device("cpu"))
    assert before["measured_on"] == {"weights": "init", "images": str(tmp_path / "train")}

    # a warm start whose ViT attends sharply (the initialisation's attention is nearly uniform,
    # so tau = 0.5 keeps about half the patches): its [CLS] mass is reached with fewer tokens
    state = build_model(load_config("tiny_albef_elip").model).state_dict()
    for name in state:
        if name.startswith("visual_encoder.blocks.") and name.endswith("attn.qkv.weight"):
            state[name] = state[name] * 30
    tag = save_checkpoint(tmp_path / "warm", state)
    cfg = load_config("tiny_albef_elip", adaptive)
    assert start_weights(cfg) == str(tag)
    after = forward_budget(cfg, device=torch.device("cpu"))
    assert after["measured_on"] == {"weights": str(tag), "images": str(tmp_path / "train")}
    assert after["tokens_per_layer"][1] < before["tokens_per_layer"][1]  # the per-image budget follows the weights

    missing = forward_budget(load_config("tiny_albef_elip", ["data.train_shards=" + str(tmp_path / "none")]),
                             device=torch.device("cpu"))
    assert missing["measured_on"] == {"weights": "init", "images": "random"}
