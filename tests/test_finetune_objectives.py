"""Retrieval and captioning fine-tuning as objective switches on ALBEF / BLIP: ``model.objectives``
picks the losses, ``model.positives_key`` makes captions of one image ITC positives (batch and
queue) and never ITM negatives, BLIP's ``[lm]`` predicts the caption after its prompt only, and
``train.init_from`` resamples a position embedding of another resolution."""
import pytest
import torch

from pipeline.config import load_config
from pipeline.models import build_model
from pipeline.models.losses import positive_targets, sample_hard_negatives

RETRIEVAL = ["model.objectives=[itc, itm]", "model.positives_key=image_id"]
TEXTS = ["a red circle", "two blue squares at the top", "a red circle on the left", "a green triangle"]


def _batch(ids=(7, 3, 7, "flickr_42")) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(len(ids), 3, 64, 64, generator=g), "text": TEXTS[:len(ids)],
            "meta": [{"image_id": i, "key": f"k{n}"} for n, i in enumerate(ids)]}


def test_positive_targets_share_each_row_among_the_keys_of_its_image():
    idx = torch.tensor([7, 3, 7])
    targets = positive_targets(idx, torch.tensor([7, 3, 7, -100, 3, 7]))
    assert torch.allclose(targets[0], torch.tensor([1, 0, 1, 0, 0, 1]) / 3)
    assert torch.allclose(targets[1], torch.tensor([0, 1, 0, 0, 1, 0]) / 2)
    assert torch.allclose(targets.sum(1), torch.ones(3))


def test_hard_negatives_never_show_the_same_image():
    sim = torch.zeros(4, 4)
    sim[0, 2] = sim[2, 0] = 20.0  # without the mask, samples 0 and 2 would pick each other
    positives = torch.tensor([7, 3, 7, 5])[:, None] == torch.tensor([7, 3, 7, 5])[None, :]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        neg_image, neg_text = sample_hard_negatives(sim, sim, generator=g, positives=positives)
        assert not positives[torch.arange(4), neg_image].any() and not positives[torch.arange(4), neg_text].any()


@pytest.mark.parametrize("config", ["tiny_albef_elip", "tiny_blip_elip"])
def test_retrieval_objectives_drop_the_text_loss_and_queue_the_image_ids(config):
    torch.manual_seed(0)
    model = build_model(load_config(config, RETRIEVAL).model).train()
    batch = _batch()
    out = model(batch)
    assert sorted(k for k in out if k.startswith("loss_")) == ["loss_itc", "loss_itm"]
    assert out["loss"].item() == pytest.approx((out["loss_itc"] + out["loss_itm"]).item(), rel=1e-6)
    ids = model.positive_ids(batch)
    assert ids[0] == ids[2] == 7 and ids[1] == 3 and ids[3] > 2**62  # a string id hashes above COCO's
    assert torch.equal(model.idx_queue[:4], ids) and (model.idx_queue[4:] == -100).all()
    out["loss"].backward()
    assert model.itm_head.weight.grad.abs().sum() > 0
    del batch["meta"][1]["image_id"]
    with pytest.raises(ValueError, match=r"samples \['k1'\]: KEY.json has no 'image_id'"):
        model(batch)


def test_itc_targets_count_same_image_keys_of_the_batch_and_the_queue():
    """Image 7's two captions are each other's positives, and so is image 3's earlier caption in
    the queue; the loss is the soft cross-entropy against those targets, not the one-hot one."""
    torch.manual_seed(0)
    cfg = load_config("tiny_albef_elip", RETRIEVAL + ["model.distill=false"]).model
    model = build_model(cfg)
    feats = torch.nn.functional.normalize(torch.randn(4, cfg.embed_dim), dim=-1)
    idx = torch.tensor([7, 3, 7, 5])
    model.idx_queue[0] = 3
    keys = lambda queue: torch.cat([feats.T, queue], dim=1)  # noqa: E731
    i_keys, t_keys = keys(model.image_queue.clone()), keys(model.text_queue.clone())
    loss = model.contrast(feats, feats, feats, feats, 0.0, idx)[0]
    targets = positive_targets(idx, torch.cat([idx, torch.tensor([3]), torch.full((cfg.queue_size - 1,), -100)]))
    assert targets[1, 4] == targets[1, 1] == 0.5 and targets[0, 2] == 0.5
    temp = model.temp.detach()
    ce = lambda sim: -(torch.log_softmax(sim, 1) * targets).sum(1).mean()  # noqa: E731
    expected = (ce(feats @ t_keys / temp) + ce(feats @ i_keys / temp)) / 2
    one_hot = (torch.nn.functional.cross_entropy(feats @ t_keys / temp, torch.arange(4))
               + torch.nn.functional.cross_entropy(feats @ i_keys / temp, torch.arange(4))) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and abs(loss.item() - one_hot.item()) > 0.1
    assert torch.equal(model.idx_queue[:4], idx)  # the step's ids follow its features into the queue


def test_objective_switches_are_checked():
    with pytest.raises(ValueError, match=r"model.objectives=\['itm'\].*containing 'itc'"):
        build_model(load_config("tiny_albef_elip", ["model.objectives=[itm]"]).model)
    with pytest.raises(ValueError, match=r"unknown \['mlm'\]"):
        build_model(load_config("tiny_blip_elip", ["model.objectives=[itc, mlm]"]).model)
    with pytest.raises(ValueError, match="itm draws its hard negatives from itc"):
        build_model(load_config("tiny_blip_elip", ["model.objectives=[itm, lm]"]).model)


def test_blip_caption_fine_tuning_predicts_only_the_caption_after_the_prompt(monkeypatch):
    torch.manual_seed(0)
    model = build_model(load_config("tiny_blip_caption").model).train()
    assert not any(k.endswith("_m.pos_embed") or "queue" in k for k in model.state_dict())  # no teacher
    out = model(_batch())
    assert sorted(k for k in out if k.startswith("loss")) == ["loss", "loss_lm"]
    assert out["tokens_per_layer"] == [65, 50, 50, 27]  # ELIP prunes (vision-only) while fine-tuning
    out["loss"].backward()
    assert model.text_decoder_attention[0].self.query.weight.grad.abs().sum() > 0

    # with fixed logits, the loss is the cross-entropy of the caption's tokens alone
    tok = model.tokenizer
    vocab = len(tok)
    logits = torch.randn(1, 12, vocab, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(model, "decode", lambda ids, mask, embeds: logits[:, :ids.shape[1]])
    ids = tok(["a picture of a red circle"], return_tensors="pt").input_ids
    mask = torch.ones_like(ids)
    prompt_length = len(tok(model.cfg.prompt).input_ids) - 1  # [CLS] a picture of
    assert prompt_length == 4
    loss = model._lm_loss(ids, mask, None, prompt_length)
    targets = ids[0, prompt_length:]  # "a red circle [SEP]"
    expected = torch.nn.functional.cross_entropy(logits[0, prompt_length - 1:ids.shape[1] - 1], targets,
                                                 label_smoothing=model.cfg.label_smoothing)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_init_from_resamples_the_position_embedding_for_another_resolution(tmp_path, monkeypatch):
    from pipeline.models import weights

    torch.manual_seed(0)
    source = build_model(load_config("tiny_albef_elip").model).state_dict()  # 64 px: 8 x 8 patches
    monkeypatch.setattr(weights, "find_checkpoint", lambda path: tmp_path)
    monkeypatch.setattr(weights, "consolidated_state_dict", lambda tag_dir: source)
    model = build_model(load_config("tiny_albef_elip", RETRIEVAL + ["model.vision.image_size=96", "data.image_size=96"]).model)
    _, copied, _ = weights.init_from(model, tmp_path)
    pos = model.visual_encoder.pos_embed
    assert "visual_encoder.pos_embed" in copied and pos.shape == (1, 1 + 12 * 12, 64)
    assert torch.equal(pos[:, 0], source["visual_encoder.pos_embed"][:, 0])  # [CLS] kept
    grid = source["visual_encoder.pos_embed"][0, 1:].reshape(8, 8, 64)
    assert torch.allclose(pos[0, 1:].reshape(12, 12, 64).mean((0, 1)), grid.mean((0, 1)), atol=0.02)


@pytest.mark.parametrize("name, lr, epochs, batch, size, k_test, queue", [
    ("albef_retrieval_coco", 1e-5, 5, 32, 384, 256, 65536),    # ALBEF configs/Retrieval_coco.yaml
    ("albef_retrieval_flickr", 1e-5, 10, 32, 384, 128, 65536),  # ALBEF configs/Retrieval_flickr.yaml
    ("blip_retrieval_coco", 1e-5, 6, 32, 384, 256, 57600),      # BLIP configs/retrieval_coco.yaml
    ("blip_caption_coco", 1e-5, 5, 32, 384, None, None),        # BLIP configs/caption_coco.yaml
    ("evlgen_caption_coco", 1e-5, 5, 16, 224, None, None),      # BLIP-2 caption_coco_ft.yaml (EVLGen has none)
])
def test_shipped_fine_tuning_configs_carry_the_official_recipes(name, lr, epochs, batch, size, k_test, queue):
    cfg = load_config(name)
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.data.batch_size, cfg.data.image_size) == (lr, epochs, batch, size)
    assert cfg.model.vision.image_size == size and cfg.eval.every_epochs == 1
    if k_test is not None:  # retrieval: ITC + ITM with same-image positives
        assert cfg.eval.k_test == k_test and cfg.model.queue_size == queue
        assert cfg.model.objectives == ["itc", "itm"] and cfg.model.positives_key == "image_id"
    elif cfg.model.name == "blip":
        assert cfg.model.objectives == ["lm"] and cfg.model.prompt == "a picture of " and cfg.eval.task == "caption"
    else:
        assert cfg.model.prompt == "a photo of " and cfg.model.generate.num_beams == 5
