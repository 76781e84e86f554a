"""transformers' ``generate`` (beam search, min/max new tokens) for a decoder that is not a
``PreTrainedModel``: a thin ``GenerationMixin`` adapter around a next-token-logits function.

No KV cache: every step re-runs the decoder on the whole prefix, which is cheap for captions
of a few dozen tokens and needs nothing from the decoder but its forward.
"""
from __future__ import annotations

from typing import Callable

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class _Adapter(PreTrainedModel, GenerationMixin):
    config_class = PretrainedConfig
    main_input_name = "input_ids"

    def __init__(self, config: PretrainedConfig, step: Callable, device: torch.device):
        super().__init__(config)
        self._step = step
        # generate() reads the model's device from its first parameter
        self.anchor = torch.nn.Parameter(torch.zeros(1, device=device), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, image_embeds: torch.Tensor = None, **_) -> CausalLMOutput:
        return CausalLMOutput(logits=self._step(input_ids, image_embeds).float().unsqueeze(1))

    def prepare_inputs_for_generation(self, input_ids, image_embeds=None, **_):
        return {"input_ids": input_ids, "image_embeds": image_embeds}


@torch.no_grad()
def generate(
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    prefix: torch.Tensor,
    image_embeds: torch.Tensor,
    *,
    vocab_size: int,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    num_beams: int = 1,
) -> torch.Tensor:
    """Decode continuations of ``prefix`` with transformers' search.

    Args:
        step: ``(ids [N, T], image_embeds [N, M, D]) -> [N, V]`` logits of the next token.
        prefix: ``[B, T0]`` prompt ids (no padding); image_embeds: ``[B, M, D]`` (repeated per beam
            by ``generate``).
    Returns:
        ``[B, T0 + T]`` ids, prefix included, ``pad_token_id`` after a finished sequence.
    """
    config = PretrainedConfig(vocab_size=vocab_size, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    adapter = _Adapter(config, step, prefix.device)
    return adapter.generate(
        input_ids=prefix, image_embeds=image_embeds,
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams, do_sample=False,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=False,
    )
