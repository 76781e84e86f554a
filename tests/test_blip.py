"""BLIP with ELIP: losses, the decoder that shares all but self-attention, captioning, local BERT."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

from pipeline.config import load_config
from pipeline.models import build_model
from pipeline.models.generation import generate
from pipeline.models.text import TextConfig, load_tokenizer
from tests.helpers_backbones import synthetic_batch
from tests.test_albef import TINY_BERT

PROMPT = "a picture of "


@pytest.fixture(scope="module")
def blip():
    torch.manual_seed(0)
    return build_model(load_config("tiny_blip_elip").model)


def test_forward_returns_finite_losses_and_elip_token_counts(blip):
    blip.train()
    batch = synthetic_batch(4)
    out = blip(batch)
    for key in ("loss", "loss_itc", "loss_itm", "loss_lm"):
        assert torch.isfinite(out[key]), key
    assert torch.allclose(out["loss"].detach(), out["loss_itc"] + out["loss_itm"] + out["loss_lm"])
    # 64 patches: ELIP keeps int(0.75*64)=48 then int(0.4*64)=25 (+ [CLS] + the fused token)
    assert out["tokens_per_layer"] == [65, 50, 50, 27] == blip.visual_encoder.expected_tokens_per_layer()
    kept = out["kept_patches"].sum(1)  # 25 kept tokens, one of them maybe the first stage's fused token
    assert out["kept_patches"].shape == (4, 64) and ((kept == 25) | (kept == 24)).all()
    blip.zero_grad(set_to_none=True)
    out["loss"].backward()
    assert blip.visual_encoder.patch_embed.proj.weight.grad is not None
    assert all(p.grad is None for p in blip.visual_encoder_m.parameters())
    assert blip.visual_encoder_m.plan.method == "none"  # the teacher ViT is unpruned


def test_decoder_shares_everything_but_self_attention(blip):
    """The LM loss reaches the embeddings, cross-attention and feed-forward weights of the encoder
    layers, and the decoder's own self-attention, never the encoder's self-attention."""
    blip.train()
    blip.zero_grad(set_to_none=True)
    tok = blip.tokenize(["two red circles at the top left"] * 2, torch.device("cpu"))
    image_embeds = blip.visual_encoder(torch.randn(2, 3, 64, 64)).tokens
    blip._lm_loss(tok.input_ids, tok.attention_mask, image_embeds).backward()
    enc = blip.text_encoder
    assert enc.embeddings.word_embeddings.weight.grad is not None
    for i, layer in enumerate(enc.encoder.layer):
        assert layer.crossattention.self.query.weight.grad is not None, i
        assert layer.intermediate.dense.weight.grad is not None and layer.output.dense.weight.grad is not None
        assert layer.attention.self.query.weight.grad is None, i  # the encoder's self-attention
        assert blip.text_decoder_attention[i].self.query.weight.grad is not None
    n_decoder = sum(p.numel() for p in blip.text_decoder_attention.parameters())
    n_self = sum(p.numel() for layer in enc.encoder.layer for p in layer.attention.parameters())
    assert n_decoder == n_self  # all the decoder adds


def test_blip_tokenizer_has_dec_and_enc_tokens(blip):
    tok = blip.tokenizer
    assert tok.convert_ids_to_tokens(tok.bos_token_id) == "[DEC]" and blip.enc_token_id == len(tok) - 1
    assert blip.text_encoder.embeddings.word_embeddings.num_embeddings == len(tok)


def test_generate_captions_greedy_matches_a_manual_decode_and_beams_work(blip):
    blip.eval()
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    greedy = blip.generate_captions(images, prompt=PROMPT, max_new_tokens=6, min_length=3, num_beams=1)
    beams = blip.generate_captions(images, prompt=PROMPT, max_new_tokens=6, min_length=3, num_beams=3)
    assert len(greedy) == len(beams) == 2
    assert all(isinstance(c, str) and c.strip() for c in greedy + beams)
    assert not any(c.startswith("a picture of") for c in greedy + beams)  # the prompt is not returned
    assert beams == blip.generate_captions(images, prompt=PROMPT, max_new_tokens=6, min_length=3, num_beams=3)

    # greedy by hand: [DEC] + prompt, argmax of the decoder, [SEP] forbidden before 3 new tokens
    tok = blip.tokenizer
    ids = tok([PROMPT] * 2, return_tensors="pt").input_ids[:, :-1]
    ids[:, 0] = tok.bos_token_id
    embeds = blip.visual_encoder(images).tokens
    done = torch.zeros(2, dtype=torch.bool)
    for step in range(6):
        logits = blip.decode(ids, torch.ones_like(ids), embeds)[:, -1]
        if step < 3:
            logits[:, tok.sep_token_id] = -math.inf
        nxt = torch.where(done, torch.full_like(done, tok.pad_token_id, dtype=torch.long), logits.argmax(-1))
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == tok.sep_token_id
        if done.all():
            break
    manual = [c.strip() for c in tok.batch_decode(ids[:, 4:], skip_special_tokens=True)]
    assert greedy == manual
    assert all(len(tok(c, add_special_tokens=False).input_ids) >= 3 for c in greedy)


def test_beam_search_finds_what_greedy_misses():
    """A two-step toy decoder: greedy takes the likelier first token (A, 0.6) into a flat
    continuation; beam search finds B then [SEP] (0.4 * 0.99 > 0.6 * 0.4)."""
    PAD, BOS, EOS, A, B = 0, 1, 2, 3, 4

    def step(ids, image_embeds):
        logits = torch.full((len(ids), 5), -30.0)
        last = ids[:, -1]
        logits[last == BOS, A], logits[last == BOS, B] = math.log(0.6), math.log(0.4)
        for tok, p in ((A, 0.4), (B, 0.3), (EOS, 0.3)):
            logits[last == A, tok] = math.log(p)
        logits[last == B, EOS] = math.log(0.99)
        logits[(last == EOS) | (last == PAD), EOS] = 0.0
        return logits + 0 * image_embeds.sum()

    prefix, embeds = torch.tensor([[BOS]]), torch.zeros(1, 2, 3)
    kwargs = dict(vocab_size=5, eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=3)
    assert generate(step, prefix, embeds, num_beams=1, **kwargs)[0].tolist() == [BOS, A, A, A]
    assert generate(step, prefix, embeds, num_beams=2, **kwargs)[0].tolist() == [BOS, B, EOS]


def test_generate_captions_rejects_bad_lengths(blip):
    with pytest.raises(ValueError, match="min_length=9"):
        blip.generate_captions(torch.zeros(1, 3, 64, 64), prompt=PROMPT, max_new_tokens=5, min_length=9, num_beams=1)


def test_local_bert_fills_encoder_and_decoder_and_keeps_added_tokens(tmp_path):
    torch.manual_seed(0)
    tok = load_tokenizer(TextConfig())
    source = BertForMaskedLM(BertConfig(vocab_size=len(tok), **TINY_BERT))
    source.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = load_config("tiny_blip_elip", [f"model.text.pretrained={tmp_path}"]).model
    model = build_model(cfg)
    src = source.state_dict()
    words = model.text_encoder.embeddings.word_embeddings.weight
    assert words.shape[0] == len(tok) + 2  # [DEC] and [ENC] added after BERT's vocabulary
    assert torch.equal(words[: len(tok)], src["bert.embeddings.word_embeddings.weight"])
    for i in range(4):  # BLIP initialises the decoder's self-attention from the same BERT
        key = f"bert.encoder.layer.{i}.attention.self.value.weight"
        assert torch.equal(model.text_decoder_attention[i].self.value.weight, src[key])
        assert torch.equal(model.text_encoder.encoder.layer[i].attention.self.value.weight, src[key])
    out = model(synthetic_batch(2))
    assert torch.isfinite(out["loss"])


def test_config_errors_name_the_keys():
    with pytest.raises(ValueError, match="model.text.text_layers=2 must equal the BERT depth 4"):
        build_model(load_config("tiny_blip_elip", ["model.text.text_layers=2"]).model)
    with pytest.raises(ValueError, match="model.vision width 64 != model.text hidden_size 32"):
        build_model(load_config("tiny_blip_elip", ["model.text.bert.hidden_size=32"]).model)


def test_itm_scores_rank_a_matching_pair_like_the_training_head(blip):
    blip.eval()
    batch = synthetic_batch(3)
    image_embeds, image_feat = blip.image_features(batch["image"])
    text_embeds, mask, text_feat = blip.text_features(batch["text"], torch.device("cpu"))
    assert image_feat.shape == text_feat.shape == (3, 32)
    scores = blip.itm_scores(image_embeds, text_embeds, mask)
    # the same logit the ITM loss trains: [ENC] caption through the image-grounded encoder
    fused = blip.text_encoder.encode_embeds(blip._itm_embeddings(blip.tokenize(batch["text"], torch.device("cpu")).input_ids),
                                            mask, image_embeds=image_embeds).hidden[:, 0]
    assert torch.allclose(scores, blip.itm_head(fused)[:, 1], atol=1e-5)
    assert F.normalize(image_feat, dim=-1).norm(dim=-1).allclose(torch.ones(3))
