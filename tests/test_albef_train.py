"""The real tiny ALBEF-ELIP under DeepSpeed: two ranks with ZeRO-3 partitioning every parameter,
then its checkpoint reloaded by ``python -m pipeline.eval retrieval``."""
import pytest

from tests.helpers_backbones import two_rank_pretraining, zero3_all_params
from tests.test_train import _free_port


@pytest.mark.slow
def test_tiny_albef_zero3_two_ranks_then_eval_reloads_the_checkpoint(tmp_path):
    rows, result = two_rank_pretraining(tmp_path, "tiny_albef_elip", port=_free_port(),
                                        deepspeed=zero3_all_params(tmp_path))
    # ELIP's plan for the tiny ViT: 64 patches -> 48 -> 25 kept (+ [CLS] + fused token)
    assert [rows[-1][f"tokens/layer_{i:02d}"] for i in range(4)] == [65, 50, 50, 27]
    assert "itc_txt_r1" in result
