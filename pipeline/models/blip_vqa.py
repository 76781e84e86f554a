"""BLIP fine-tuned for VQA (salesforce/BLIP ``models/blip_vqa.py``) answering by generation
(BLIP's ``inference='generate'``).

What follows BLIP: the question, [ENC] first, goes through the image-grounded text encoder
(every layer cross-attends to the ELIP-pruned ViT's tokens); an answer decoder of the same depth
(causal self-attention, cross-attention to the question states, FFN, LM head) writes the answer
after [DEC] by beam search (BLIP: 3 beams, ``max_length`` 10 counting [DEC], i.e. 9 new tokens).
Training loss: the decoder's token NLL of each of a question's distinct human answers (label
smoothing 0.1, summed per answer as BLIP's ``reduction='none'``), weighted by the answer's share
of the human answers (BLIP's / ALBEF's ``weights``), summed and divided by the batch size. The
decoder starts from the pre-trained BLIP's image-grounded decoder (``init_from_renames``: its
own causal self-attention, and the cross-attention, FFN, embeddings and LM head it shares with
the encoder during pre-training); in fine-tuning the two are separate copies, as in BLIP.

Where this differs: ELIP's question guidance needs the question's text-only [CLS], so with a
text-guided reduction the question also runs once through the unimodal encoder (BLIP-VQA has
no such pass); generation masks the question's padding (BLIP attends to it); at least one new
token (BLIP's ``min_length=1`` counts [DEC]); no candidate ranking (``inference='rank'``, BLIP's
default, is what ``albef_vqa`` does).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from pipeline.models import register_model
from pipeline.models.answer_decoder import AnswerDecoder, targets_from_meta, weighted_answer_loss
from pipeline.models.blip import add_encoders
from pipeline.models.generation import generate
from pipeline.models.pairing import encode_pair
from pipeline.models.text import TextConfig, tokenize
from pipeline.models.vit import VitConfig


@dataclass
class BlipVqaConfig:
    """``model:`` section for ``name: blip_vqa`` (BLIP's ViT-B/16 at 480 px + BERT-base).
    ``num_beams``, ``max_new_tokens``, ``min_length`` (new tokens): the answer generation."""

    name: str = "blip_vqa"
    vision: VitConfig = field(default_factory=lambda: VitConfig(image_size=480))
    text: TextConfig = field(default_factory=lambda: TextConfig(text_layers=12, max_tokens=35))
    label_smoothing: float = 0.1
    num_beams: int = 3
    max_new_tokens: int = 9
    min_length: int = 1


class BlipVQA(nn.Module):
    """``forward(batch) -> dict(loss, loss_vqa, tokens_per_layer, kept_patches)`` with the answers
    from each sample's ``KEY.json`` (``batch["meta"]``); ``answer_questions`` generates."""

    def __init__(self, cfg: BlipVqaConfig):
        super().__init__()
        self.cfg = cfg
        add_encoders(self, cfg)
        enc = self.text_encoder
        self.text_decoder = AnswerDecoder(enc.config, len(enc.encoder.layer))
        dec = self.text_decoder  # at build time a copy of the encoder (BLIP initialises both from BERT)
        dec.embeddings.load_state_dict(enc.embeddings.state_dict())
        for mine, theirs in zip(dec.encoder.layer, enc.encoder.layer):
            mine.load_state_dict(theirs.state_dict())
        dec.cls.load_state_dict(enc.cls.state_dict())
        renames = {"text_encoder.embeddings.": ["text_encoder.embeddings.", "text_decoder.embeddings."],
                   "text_encoder.cls.": ["text_encoder.cls.", "text_decoder.cls."]}
        for i in range(len(enc.encoder.layer)):
            renames[f"text_decoder_attention.{i}."] = f"text_decoder.encoder.layer.{i}.attention."
            for part in ("crossattention", "intermediate", "output"):
                own = f"text_encoder.encoder.layer.{i}.{part}."
                renames[own] = [own, f"text_decoder.encoder.layer.{i}.{part}."]
        self.init_from_renames = renames

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual_encoder.set_grad_checkpointing(enable)
        self.text_encoder.set_grad_checkpointing(enable)

    def _question_states(self, images: torch.Tensor, questions: list[str]):
        """``[B, 3, H, W]`` images, B questions -> (states ``[B, L, D]``, mask ``[B, L]``, the ViT's output)."""
        enc = self.text_encoder
        tok = tokenize(self.tokenizer, questions, self.cfg.text.max_tokens, images.device)
        index = None
        if self.visual_encoder.text_guided or self.image_first:  # ELIP's guidance (or the image's) first
            text, vision = encode_pair(self.visual_encoder, enc.encode, images, tok.input_ids, tok.attention_mask,
                                       self.image_first)
            index = text.index
        else:
            vision = self.visual_encoder(images, track_patches=True)
        ids = tok.input_ids.clone()
        ids[:, 0] = self.enc_token_id
        out = enc.encode_embeds(enc.embeddings(input_ids=ids), tok.attention_mask, index=index,
                                image_embeds=vision.tokens)
        return out.hidden, out.mask, vision

    def forward(self, batch: dict) -> dict:
        """The weighted answer LM loss. ``batch``: ``image`` ``[B, 3, H, W]``, ``text`` B
        questions, ``meta`` B ``KEY.json`` dicts with ``answers``."""
        states, mask, vision = self._question_states(batch["image"], batch["text"])
        texts, weights, counts = targets_from_meta(batch["meta"])
        ans = tokenize(self.tokenizer, texts, self.cfg.text.max_tokens, states.device)
        ans.input_ids[:, 0] = self.tokenizer.bos_token_id  # [DEC] starts an answer
        loss = weighted_answer_loss(self.text_decoder, ans.input_ids, ans.attention_mask, weights, counts,
                                    states, mask, self.cfg.label_smoothing)
        return {"loss": loss, "loss_vqa": loss.detach(), "tokens_per_layer": vision.tokens_per_layer,
                "kept_patches": vision.kept_patches}

    # -- evaluation ----------------------------------------------------------------------------
    @property
    def vqa_defaults(self) -> dict:
        """:meth:`answer_questions`' settings from the config (BLIP's: 3 beams, 9 new tokens, at least 1)."""
        return {"num_beams": self.cfg.num_beams, "max_new_tokens": self.cfg.max_new_tokens,
                "min_length": self.cfg.min_length}

    @torch.no_grad()
    def answer_questions(self, images: torch.Tensor, questions: list[str], *, num_beams: int, max_new_tokens: int,
                         min_length: int) -> list[str]:
        """Generated answers (beam search after [DEC], ended by [SEP]).

        Args:
            images: ``[B, 3, H, W]``; questions: B strings; num_beams: beam width;
            max_new_tokens, min_length: most and fewest answer tokens.
        Returns:
            B answers.
        """
        if len(questions) != images.shape[0]:
            raise ValueError(f"answer_questions: {images.shape[0]} images but {len(questions)} questions")
        if max_new_tokens < 1 or not 0 <= min_length <= max_new_tokens or num_beams < 1:
            raise ValueError(f"answer_questions: need max_new_tokens >= 1, 0 <= min_length <= max_new_tokens, "
                             f"num_beams >= 1; got {max_new_tokens}, {min_length}, {num_beams}")
        states, mask, _ = self._question_states(images, questions)
        tok = self.tokenizer
        bos = torch.full((len(questions), 1), tok.bos_token_id, dtype=torch.long, device=states.device)

        def step(ids: torch.Tensor, question_states: torch.Tensor) -> torch.Tensor:
            # generate() repeats each question's states once per beam, in order: so is its mask
            m = mask.repeat_interleave(ids.shape[0] // mask.shape[0], 0)
            return self.text_decoder(ids, torch.ones_like(ids), question_states, m)[:, -1]

        out = generate(step, bos, states, vocab_size=len(tok), eos_token_id=tok.sep_token_id,
                       pad_token_id=tok.pad_token_id, max_new_tokens=max_new_tokens, min_new_tokens=min_length,
                       num_beams=num_beams)
        return [a.strip() for a in tok.batch_decode(out[:, 1:], skip_special_tokens=True)]


register_model("blip_vqa", BlipVqaConfig, BlipVQA, eval_task="vqa")
