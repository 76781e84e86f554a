"""The text-token pruning ablation (ELIP's Table 4): the pure selection and each backbone's use of it."""
import pytest
import torch

from pipeline.config import load_config
from pipeline.models import build_model
from pipeline.tokens import textprune
from tests.test_albef import CAPTIONS, tiny_albef

# [CLS] w1..w7 [SEP] and [CLS] w1..w3 [SEP] + 4 pads
MASK = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])


def _select(strategy, attention=None, seed=0):
    hidden = torch.arange(9.0).view(1, 9, 1).expand(2, 9, 3)  # token value = its position
    scores = textprune.prune_scores(strategy, MASK, attention, torch.Generator().manual_seed(seed))
    return textprune.select(hidden, MASK, scores, textprune.num_kept(9, 0.4))


def test_num_kept_prunes_forty_percent_of_the_tokens_after_cls():
    assert textprune.num_kept(9, 0.4) == 8 - 3  # int(0.4 * 8) = 3 dropped
    assert textprune.num_kept(31, 0.4) == 30 - 12


@pytest.mark.parametrize("strategy", ["random", "post", "learned"])
def test_every_strategy_keeps_cls_and_drops_padding_first(strategy):
    attention = torch.rand(2, 8, generator=torch.Generator().manual_seed(1))
    hidden, mask, index = _select(strategy, attention)
    assert hidden.shape == (2, 6, 3) and mask.shape == (2, 6) and index.shape == (2, 6)
    assert (index[:, 0] == 0).all() and (hidden[:, 0] == 0).all()  # [CLS] first
    assert (index[:, 1:].diff(dim=1) > 0).all()  # original order
    assert torch.equal(hidden[..., 0], index.float())  # the rows are the kept positions
    # the short caption keeps all 4 of its real tokens (and one pad): padding goes first
    assert index[1].tolist()[:5] == [0, 1, 2, 3, 4] and mask[1].tolist() == [1, 1, 1, 1, 1, 0]
    assert mask[0].all()


def test_strategies_choose_differently():
    assert _select("post")[2][0].tolist() == [0, 1, 2, 3, 4, 5]  # the caption's head
    attention = torch.zeros(2, 8)
    attention[0, [7, 5, 3, 1, 0]] = 1.0  # positions 8, 6, 4, 2, 1 attended most by the image [CLS]
    assert _select("learned", attention)[2][0].tolist() == [0, 1, 2, 4, 6, 8]
    draws = {tuple(_select("random", seed=s)[2][0].tolist()) for s in range(6)}
    assert len(draws) > 1


def test_learned_needs_the_attention_and_unknown_strategies_fail():
    with pytest.raises(ValueError, match="image-\\[CLS\\] attention"):
        textprune.prune_scores("learned", MASK)
    with pytest.raises(ValueError, match="text.prune.strategy='top'"):
        textprune.prune_scores("top", MASK)


def _forward(model, images=4):
    torch.manual_seed(0)
    return model({"image": torch.randn(images, 3, 64, 64), "text": CAPTIONS[:images], "epoch_progress": 1.0})


@pytest.mark.parametrize("strategy", ["random", "post", "learned"])
def test_albef_prunes_text_before_the_second_half_of_its_text_layers(strategy):
    cfg = tiny_albef("none" if strategy == "learned" else "elip")
    cfg.text.prune.strategy = strategy
    torch.manual_seed(0)
    model = build_model(cfg)
    out = _forward(model)
    L = model.tokenize(CAPTIONS, torch.device("cpu")).input_ids.shape[1]
    assert out["text_tokens_per_layer"] == [L, 1 + textprune.num_kept(L, 0.4)]  # 2 text layers, pruned before #1
    assert all(torch.isfinite(out[k]) for k in ("loss", "loss_itc", "loss_itm", "loss_mlm"))
    out["loss"].backward()
    model.eval()  # evaluation encodes whole captions
    embeds, mask, _ = model.text_features(CAPTIONS, torch.device("cpu"))
    assert embeds.shape[1] == L and mask.shape[1] == L


@pytest.mark.parametrize("name", ["tiny_blip_elip", "tiny_meter_elip"])
def test_blip_and_meter_prune_text_at_half_depth(name):
    cfg = load_config(name, ["model.text.prune.strategy=post"]).model
    torch.manual_seed(0)
    model = build_model(cfg)
    out = _forward(model)
    L = model.tokenize(CAPTIONS, torch.device("cpu")).input_ids.shape[1]
    kept = 1 + textprune.num_kept(L, 0.4)
    assert out["text_tokens_per_layer"] == [L, L, kept, kept]  # 4 text layers, pruned before #2
    assert torch.isfinite(out["loss"])


def test_learned_text_pruning_and_elip_cannot_guide_each_other():
    cfg = tiny_albef("elip")
    cfg.text.prune.strategy = "learned"
    with pytest.raises(ValueError, match="strategy=learned needs the image \\[CLS\\].*method=elip"):
        build_model(cfg)
    with pytest.raises(ValueError, match="text.prune.layer=2 must be within 1..1"):
        build_model(load_config("tiny_albef_elip", ["model.text.prune.strategy=random", "model.text.prune.layer=2"]).model)
