"""EVLGen on CPU with tiny OPT and LLaMA directories: TomeFormer token counts, soft prompts,
the label mask, a frozen LLM that gets no gradient, generation, the Q-Former baseline and the
video variant's temporal modules."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from pipeline.config import load_config
from pipeline.models.connectors import QFormerConfig, QFormerConnector, TomeFormer, TomeFormerConfig
from pipeline.models.evlgen import EVLGen, LLMConfig
from pipeline.models.video import FrozenVision, VideoConfig
from pipeline.models.vit import VitConfig
from pipeline.train.optim import build_optimizer
from tests.helpers_evlgen import TINY_LLAMA, tiny_config, tiny_llm

TINY_BERT = dict(hidden_size=32, num_hidden_layers=12, num_attention_heads=2, intermediate_size=64)
CAPTIONS = ["a red circle at the top left", "two blue squares in the bottom right and a green triangle at the top left"]


@pytest.fixture(scope="module")
def llms(tmp_path_factory):
    base = tmp_path_factory.getbasetemp() / "tiny_llms"  # shared by the test modules of a session
    return {"opt": tiny_llm(base, "opt"), "llama": tiny_llm(base, "llama")}


def build(llm_dir: str, **model) -> EVLGen:
    torch.manual_seed(0)
    return EVLGen(tiny_config(llm_dir, **model))


def images(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("merge", ["mean", "weighted"])
def test_tomeformer_merges_257_to_29_with_r19_over_12_layers_and_r0_keeps_all(merge):
    tokens = torch.randn(2, 257, 48)
    merging = TomeFormer(TomeFormerConfig(bert=TINY_BERT, r=19, merge=merge), vision_width=48).eval()
    out, lengths = merging(tokens)
    assert lengths == [257 - 19 * i for i in range(13)] and lengths[-1] == 29
    assert out.shape == (2, 29, 32) and merging.output_tokens(257) == lengths
    keep = TomeFormer(TomeFormerConfig(bert=TINY_BERT, r=0, merge=merge), vision_width=48).eval()
    out, lengths = keep(tokens)
    assert lengths == [257] * 13 and out.shape == (2, 257, 32)


def test_weighted_and_mean_merges_differ_only_when_tokens_merge():
    tokens = torch.randn(2, 65, 48)
    outs = {}
    for r in (0, 8):
        for merge in ("mean", "weighted"):
            torch.manual_seed(0)
            enc = TomeFormer(TomeFormerConfig(bert=dict(TINY_BERT, num_hidden_layers=2), r=r, merge=merge), 48).eval()
            outs[r, merge] = enc(tokens)[0]
    torch.testing.assert_close(outs[0, "mean"], outs[0, "weighted"])
    assert outs[8, "mean"].shape == outs[8, "weighted"].shape == (2, 49, 32)
    assert not torch.allclose(outs[8, "mean"], outs[8, "weighted"])


def test_connectors_load_a_local_bert_the_blip2_way(tmp_path):
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=99, **dict(TINY_BERT, num_hidden_layers=2))).save_pretrained(tmp_path / "bert")
    bert = BertModel.from_pretrained(tmp_path / "bert").state_dict()
    tome = TomeFormer(TomeFormerConfig(pretrained=str(tmp_path / "bert")), vision_width=48)
    q = QFormerConnector(QFormerConfig(pretrained=str(tmp_path / "bert"), num_queries=8), vision_width=48)
    key = "encoder.layer.1.attention.self.query.weight"
    assert torch.equal(tome.state_dict()[key], bert[key])
    assert torch.equal(q.qformer.state_dict()["encoder.layer.1.attention.attention.query.weight"], bert[key])
    assert torch.equal(q.qformer.state_dict()["encoder.layer.1.output_query.dense.weight"],
                       bert["encoder.layer.1.output.dense.weight"])
    assert torch.equal(q.qformer.state_dict()["layernorm.weight"], bert["embeddings.LayerNorm.weight"])
    out, lengths = q(torch.randn(2, 65, 48))
    assert out.shape == (2, 8, 32) and lengths == [8, 8, 8]
    # cross-attention every other layer (BLIP-2): layers 0 and 2 of 2 -> only layer 0
    assert [layer.has_cross_attention for layer in q.qformer.encoder.layer] == [True, False]


def sentencepiece_style_tokenizer(out) -> str:
    """A LLaMA-like tokenizer ("▁" word prefixes, "\\n" its own token, no pad token), trained on
    synthetic captions: the prompt/caption boundary must hold for it too."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from data_prep.tiny_llm import caption_corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("\n"), "isolated"),
                                                 pre_tokenizers.Metaspace(prepend_scheme="first")])
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    tok.train_from_iterator([c + "\n" for g in caption_corpus(200) for c in g],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(out))
    return str(out)


@pytest.mark.parametrize("kind", ["opt", "llama", "llama-sentencepiece"])
def test_soft_prompts_shape_and_exactly_prompt_and_padding_masked(llms, kind, tmp_path):
    if kind == "llama-sentencepiece":
        cfg = tiny_config(llms["llama"])
        llm = replace(cfg.llm, tokenizer=sentencepiece_style_tokenizer(tmp_path / "sp"))
        model = build(llms["llama"], prompt="a picture of", llm=llm)
        assert model.tokenizer.pad_token_id is None and model.pad_id == model.tokenizer.eos_token_id
    else:
        model = build(llms[kind], prompt="a picture of")
    prompts, lengths = model.soft_prompts(images())
    assert lengths == [65, 41, 21] and model.num_prompt_tokens() == 21
    assert prompts.shape == (2, 21, model.llm_width) and prompts.dtype == model.llm_dtype
    inputs, mask, labels = model.lm_inputs(prompts, CAPTIONS)
    tok = model.tokenizer
    head = [tok.bos_token_id] + tok("a picture of", add_special_tokens=False).input_ids
    for b, caption in enumerate(CAPTIONS):
        target = tok("a picture of " + caption + "\n", add_special_tokens=False).input_ids[len(head) - 1:]
        start = 21 + len(head)
        assert (labels[b, :start] == -100).all()  # soft prompts, BOS, text prompt
        assert labels[b, start:start + len(target)].tolist() == target  # the caption and its "\n"
        assert (labels[b, start + len(target):] == -100).all() and (mask[b, start + len(target):] == 0).all()
        assert mask[b, :start + len(target)].all()
        assert target[-1] == model.newline_id
    assert inputs.shape[:2] == labels.shape == mask.shape
    torch.testing.assert_close(inputs[:, :21], prompts)
    # the text prompt's embeddings follow the soft prompts unchanged
    torch.testing.assert_close(inputs[0, 21:21 + len(head)], model.llm.get_input_embeddings()(torch.tensor(head)))


def test_llm_gets_no_gradient_and_stays_bit_identical_while_the_connector_trains(llms):
    model = build(llms["opt"]).train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("llm.", "vision."))}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith(("llm.", "vision.")) for n in trainable)
    cfg = load_config("tiny_evlgen_opt")
    optimizer = build_optimizer(model, cfg, offload=False)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        model({"image": images(), "text": CAPTIONS})["loss"].backward()
        optimizer.step()
    assert all(p.grad is None for p in model.llm.parameters())
    assert all(p.grad is None for p in model.vision.parameters())
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert "llm_proj.weight" in moved and any(n.startswith("connector.") for n in moved)


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_generation_returns_nonempty_captions_within_max_new_tokens(llms, kind):
    model = build(llms[kind]).eval()
    generated = []
    decode = model.tokenizer.batch_decode
    model.tokenizer.batch_decode = lambda ids, **kw: generated.append(ids) or decode(ids, **kw)
    kwargs = dict(model.caption_defaults, max_new_tokens=6, min_length=2)
    # 21 soft prompts + BOS are already longer than transformers' default max_length of 20:
    # captions come out only because generation is bounded by new tokens
    captions = model.generate_captions(images(3), **kwargs)
    assert len(captions) == 3 and all(isinstance(c, str) and c.strip() for c in captions)
    assert 2 <= generated[0].shape[1] <= 6


def test_bf16_llm_trains_the_connector_in_fp32(llms):
    cfg = tiny_config(llms["opt"])
    model = build(llms["opt"], llm=replace(cfg.llm, dtype="bf16"))
    assert model.llm_dtype == torch.bfloat16 and model.llm_proj.weight.dtype == torch.float32
    model({"image": images(), "text": CAPTIONS})["loss"].backward()
    assert model.llm_proj.weight.grad is not None and model.llm_proj.weight.grad.dtype == torch.float32


def test_qformer_connector_trains_the_same_way(llms):
    model = build(llms["opt"], connector="qformer")
    assert model.num_prompt_tokens() == 16
    out = model({"image": images(), "text": CAPTIONS})
    out["loss"].backward()
    assert model.connector.query_tokens.grad is not None and out["tokens_per_layer"] == [16, 16, 16]


def vicuna_style_dir(out) -> str:
    """A LLaMA directory laid out as Vicuna's: weights, config, ``tokenizer_config.json`` and a
    sentencepiece ``tokenizer.model`` (trained here on a few sentences), no ``tokenizer.json``."""
    import json

    import sentencepiece as spm
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True)
    # byte fallback as in LLaMA's tokenizer: "\n" (the caption end) is the byte piece <0x0A>
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CAPTIONS + ["a picture of", "a photo of a yellow star"]),
        model_prefix=str(out / "tokenizer"), model_type="bpe", vocab_size=300, hard_vocab_limit=False,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2)
    (out / "tokenizer.vocab").unlink()
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
         "eos_token": "</s>", "unk_token": "<unk>", "legacy": False}))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=320, bos_token_id=1, eos_token_id=2, **{
        k: v for k, v in TINY_LLAMA.items() if k != "model_type"})).save_pretrained(out)
    return str(out)


def test_a_vicuna_directory_with_only_a_sentencepiece_model_loads(tmp_path):
    llm_dir = vicuna_style_dir(tmp_path / "vicuna")
    assert sorted(p.name for p in Path(llm_dir).iterdir() if p.name.startswith("tokenizer")) == \
        ["tokenizer.model", "tokenizer_config.json"]
    model = build(llm_dir, prompt="a picture of")
    tok = model.tokenizer
    ids = tok("a red circle at the top left\n").input_ids
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == "a red circle at the top left\n"
    assert model.newline_id == tok.convert_tokens_to_ids("<0x0A>")
    loss = model({"image": images(), "text": CAPTIONS})["loss"]
    assert torch.isfinite(loss)


def test_unsupported_llm_or_missing_directory_is_a_clear_error(llms, tmp_path):
    cfg = tiny_config(llms["opt"])
    with pytest.raises(ValueError, match="model.llm.config.*'gpt2'"):
        EVLGen(replace(cfg, llm=LLMConfig(config={"model_type": "gpt2"})))
    with pytest.raises(FileNotFoundError, match="model.llm.pretrained: no config.json"):
        EVLGen(replace(cfg, llm=LLMConfig(pretrained=str(tmp_path / "nowhere"))))
    # the model never builds an LLM: it names the command that does
    with pytest.raises(FileNotFoundError, match="python -m data_prep.tiny_llm --config"):
        EVLGen(replace(cfg, llm=LLMConfig(pretrained=str(tmp_path / "nowhere"), build_if_missing=True)))
    assert not (tmp_path / "nowhere").exists()


def test_data_prep_builds_the_tiny_llm_a_config_asks_for(tmp_path):
    from data_prep.tiny_llm import build_for_config

    assert build_for_config("tiny_albef_elip", []) is None  # no LLM to build
    out = tmp_path / "llm"
    assert build_for_config("tiny_evlgen_opt", [f"model.llm.pretrained={out}", "model.llm.build_steps=0"]) == out
    assert (out / "config.json").is_file() and any(out.glob("*.safetensors"))
    assert build_for_config("tiny_evlgen_opt", [f"model.llm.pretrained={out}", "model.llm.build_if_missing=false"]) is None


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "eva_giant_patch14_clip_224"])
def test_temporal_module_is_the_identity_at_init_and_only_it_trains(name):
    cfg = VitConfig(model_name=name, image_size=32, timm_kwargs=dict(depth=2, embed_dim=32, num_heads=2, patch_size=8))
    video = FrozenVision(cfg, VideoConfig(num_frames=4, dim=16, heads=2)).train()
    frames = torch.randn(2, 4, 3, 32, 32)
    per_frame = video.vit.forward_features(frames.flatten(0, 1)).view(2, 4, 17, 32).mean(1)
    out = video(frames)
    assert torch.equal(out, per_frame)  # exactly the image model, averaged over frames
    assert torch.equal(FrozenVision(cfg, VideoConfig())(frames), per_frame)  # the image model on frames
    assert {n.split(".")[0] for n, p in video.named_parameters() if p.requires_grad} == {"temporal"}
    for t in video.temporal:
        t.gate.data.fill_(0.5)
    out = video(frames)
    assert not torch.allclose(out, per_frame)
    out.square().mean().backward()
    assert video.temporal[0].qkv.weight.grad.abs().sum() > 0  # through the frozen second block
    assert all(p.grad is None for p in video.vit.parameters())


def test_video_model_takes_frames(llms):
    model = build(llms["opt"], video=VideoConfig(num_frames=4, dim=16, heads=2))
    frames = torch.randn(2, 3, 3, 64, 64)  # 3 of at most 4 frames
    model({"image": frames, "text": CAPTIONS})["loss"].backward()
    assert model.vision.temporal[1].gate.grad is not None
    assert len(model.eval().generate_captions(frames, **dict(model.caption_defaults, max_new_tokens=4))) == 2
