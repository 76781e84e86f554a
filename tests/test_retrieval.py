"""Zero-shot retrieval: the recall arithmetic and a run on synthetic evaluation shards."""
import numpy as np
import pytest
import torch

from data_prep import synthetic
from pipeline.eval.retrieval import chance_r1, evaluate_shards, recall_at_k
from pipeline.models import build_model
from tests.test_albef import tiny_albef


def test_recall_counts_an_image_at_its_best_caption():
    # 2 images x 2 captions: image 0 owns captions 0,1; image 1 owns 2,3
    img2txt, txt2img = [[0, 1], [2, 3]], [0, 0, 1, 1]
    i2t = np.array([[0.1, 0.2, 0.9, 0.8],   # image 0: its best caption (1) ranks 3rd
                    [0.0, 0.1, 0.5, 0.4]])  # image 1: caption 2 ranks 1st
    t2i = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.7], [0.6, 0.5]])  # captions 0, 2 right; 1, 3 wrong
    m = recall_at_k(i2t, t2i, img2txt, txt2img)
    assert m["txt_r1"] == 50.0 and m["txt_r5"] == 100.0
    assert m["img_r1"] == 50.0 and m["img_r5"] == 100.0
    assert m["r_mean"] == pytest.approx((50 + 100 + 100 + 50 + 100 + 100) / 6)
    assert chance_r1(img2txt, 4) == (50.0, 50.0)


def test_perfect_scores_give_full_recall():
    n = 12
    eye = np.eye(n)
    m = recall_at_k(eye, eye, [[i] for i in range(n)], list(range(n)))
    assert all(m[k] == 100.0 for k in ("txt_r1", "img_r1", "txt_r10", "img_r10"))


def test_evaluate_shards_on_synthetic_eval_set(tmp_path):
    synthetic.build(tmp_path / "eval", num=12, split="test", captions_per_image=3, image_size=64,
                    shard_size=5, min_shards=1)
    torch.manual_seed(0)
    model = build_model(tiny_albef("elip")).eval()
    m = evaluate_shards(model, str(tmp_path / "eval"), image_size=64, batch_size=5, k_test=4)
    assert m["num_images"] == 12 and m["num_texts"] == 36
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"):
        assert 0.0 <= m[key] <= 100.0
    assert m["chance_txt_r1"] == pytest.approx(100 * 3 / 36) and m["chance_img_r1"] == pytest.approx(100 / 12)
    # ITM only re-ranks the ITC top k=4: R@5 and R@10 can only cover what ITC put there
    assert m["img_r10"] >= m["img_r5"] >= m["img_r1"]



class _CountingModel:
    def __init__(self):
        self.calls = 0

    def itm_scores(self, image_embeds, text_embeds, mask):
        self.calls += 1
        return image_embeds[:, 0, 0] + text_embeds[:, 0, 0]


def test_rerank_makes_the_same_number_of_itm_calls_on_every_rank(monkeypatch):
    import pipeline.eval.retrieval as retrieval

    monkeypatch.setattr(retrieval.dist, "all_reduce", lambda tensor: None)  # each rank's share alone
    sims = torch.randn(5, 7)
    images, texts, mask = torch.randn(5, 2, 3), torch.randn(7, 4, 3), torch.ones(7, 4)
    calls = []
    for rank, owned in ((0, range(0, 3)), (1, range(3, 5))):  # 5 rows over 2 ranks: 3 + 2
        model = _CountingModel()
        scores = retrieval._rerank(model, sims, images, texts, mask, True, 3, rank, 2)
        calls.append(model.calls)
        for q in range(5):
            if q in owned:  # ITM scores on the ITC top 3, the rest unranked
                assert (scores[q] != retrieval.UNRANKED).sum().item() == 3
            else:  # zeros, for the other rank's share to be summed in
                assert (scores[q] == 0).all()
    assert calls == [3, 3]  # rank 1 repeats a row so that collective ZeRO-3 gathers stay paired
