"""A tiny causal LM for CPU demos and tests: a GPT-2-style tokenizer shipped with the package
and a small OPT or LLaMA, pre-trained for a few seconds on synthetic caption text.

EVLGen freezes a *pretrained* LLM and only teaches a connector to steer it through its input
embeddings; a real LLM can be steered because it reads its context. No model hub is reachable
here, and a tiny LM learns to copy from its context only after thousands of steps, so the demo
builds its "pretrained" LLM once in a way that teaches it to read context quickly: language-model
training on captions of the synthetic shapes dataset (text only, no images), each caption
preceded by a variable number of context vectors that are either a learned "nothing" vector or,
for most captions, codes of what the caption says (one vector per shape group: colour + shape +
count + place). The codes are thrown away afterwards; what remains is an LLM whose input space
has directions that mean "red", "two", "top left"..., which EVLGen's connector must find from
pixels alone. The result is saved with ``save_pretrained`` into the directory the model config
points to; everything after that goes through ``from_pretrained(local_dir)`` (the model side,
:func:`pipeline.models.evlgen.load_llm`, only loads that directory).

``python -m data_prep.tiny_llm --config CONFIG [key=value ...]`` builds the LLM of an EVLGen
config whose ``model.llm.build_if_missing`` is set, into ``model.llm.pretrained``, unless it is
there already (``launch/demo.sh`` runs it before training; any other config is left alone).
Regenerate the shipped tokenizer with ``python -m data_prep.tiny_llm tokenizer``.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import sys
from pathlib import Path

import torch

from data_prep.captions import pre_caption
from data_prep.synthetic import COLOURS, NUM_TEMPLATES, POSITIONS, SHAPES, _caption, compose
from pipeline.models.evlgen import TINY_GPT2_TOKENIZER

log = logging.getLogger(__name__)
# OPT's special tokens and ids: "</s>" is both BOS and EOS.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")


def caption_corpus(num: int, seed: int = 12345) -> list[list[str]]:
    """``num`` synthetic compositions, each as its five paraphrases (one per template), drawn
    with a seed and split of their own (never the training or evaluation images')."""
    rng = random.Random(seed)
    return [[pre_caption(_caption(compose(seed, i, split="lm"), t, rng.randrange(2))) for t in range(NUM_TEMPLATES)]
            for i in range(num)]


def build_tiny_tokenizer(out_dir: str | Path = TINY_GPT2_TOKENIZER, vocab_size: int = 400):
    """Train a byte-level BPE (GPT-2/OPT style: any text encodes, ``"\\n"`` is one token) on
    the synthetic captions and save it as a ``PreTrainedTokenizerFast`` that prepends ``</s>``
    like OPT's tokenizer. Returns the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([c + "\n" for group in caption_corpus(800) for c in group], trainer=trainer)
    bos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="right")
    fast.save_pretrained(str(out_dir))
    return fast


def load_tiny_tokenizer(path: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path or TINY_GPT2_TOKENIZER)


def build_tiny_llm(out_dir: str | Path, config: dict, *, steps: int = 300, seed: int = 0,
                   tokenizer: str | None = None, batch_size: int = 32, lr: float = 3e-3) -> Path:
    """Create a tiny causal LM (``config``: transformers config keys with ``model_type`` ``opt``
    or ``llama``), LM-train it ``steps`` steps on synthetic captions and save model + tokenizer
    to ``out_dir``. Deterministic in ``seed``. Several processes may call it at once: one builds
    under a file lock, the others wait and find it done. Under torch.distributed only rank 0
    builds (transformers' ``save_pretrained`` writes weights on rank 0 only); the other ranks
    wait for the directory."""
    import fcntl

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
        _wait_for(out_dir)
        return out_dir
    with open(out_dir.with_name(f".{out_dir.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out_dir / "config.json").is_file():
            _build(out_dir, config, steps, seed, tokenizer, batch_size, lr)
    return out_dir


def _wait_for(out_dir: Path, timeout_s: float = 3600.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not (out_dir / "config.json").is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"model.llm.pretrained: rank 0 did not build {out_dir} within {timeout_s:.0f} s")
        time.sleep(1.0)


def _build(out_dir: Path, config: dict, steps: int, seed: int, tokenizer: str | None, batch_size: int,
           lr: float) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = load_tiny_tokenizer(tokenizer)
    kwargs = dict(config)
    model_type = kwargs.pop("model_type", None)
    if model_type not in ("opt", "llama"):
        raise ValueError(f"model.llm.config.model_type: expected 'opt' or 'llama' for a built LLM, got {model_type!r}")
    kwargs.update(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)
    cfg = AutoConfig.for_model(model_type, **kwargs)
    log.info("building the tiny %s LLM in %s (%d LM pre-training steps, once)", model_type, out_dir, steps)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
        if steps > 0:
            _pretrain(model, tok, steps, seed, batch_size, lr, cfg.max_position_embeddings)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if not (tmp / "config.json").is_file() or not any(tmp.glob("*.safetensors")):
        raise RuntimeError(f"saving the tiny LLM to {tmp} wrote no weights")
    os.rename(tmp, out_dir)  # complete or absent, never half-written


class _ContextCodes(torch.nn.Module):
    """Pre-training only: one learned vector per shape group (sum of colour, shape, count, place
    and group-slot embeddings) and a learned "nothing" vector for empty context."""

    def __init__(self, width: int):
        super().__init__()
        values = {"colour": sorted(COLOURS), "shape": SHAPES, "count": (1, 2, 3), "position": POSITIONS}
        self.index = {key: {v: i for i, v in enumerate(vals)} for key, vals in values.items()}
        self.tables = torch.nn.ModuleDict({k: torch.nn.Embedding(len(v), width) for k, v in self.index.items()})
        self.slot = torch.nn.Embedding(2, width)
        self.nothing = torch.nn.Parameter(torch.zeros(width))
        for e in [*self.tables.values(), self.slot]:
            torch.nn.init.normal_(e.weight, std=0.5)

    def forward(self, groups: list[dict] | None, length: int) -> torch.Tensor:
        """``[length, width]``: "nothing" vectors, then one code per group (none for ``groups=None``)."""
        codes = []
        for g, group in enumerate(groups or []):
            vec = self.slot.weight[g]
            for key, table in self.tables.items():
                vec = vec + table.weight[self.index[key][group[key]]]
            codes.append(vec)
        pad = [self.nothing] * (length - len(codes))
        return torch.stack(pad + codes)


def _pretrain(model, tok, steps: int, seed: int, batch_size: int, lr: float, max_positions: int) -> None:
    """Captions after 0-40 context vectors; for 80% of them the last vectors code their groups."""
    rng = random.Random(seed)
    embed = model.get_input_embeddings()
    codes = _ContextCodes(embed.embedding_dim)
    params = list(model.parameters()) + list(codes.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        rows = []
        for _ in range(batch_size):
            groups = compose(seed + 7, rng.randrange(10**6), split="lm")
            text = pre_caption(_caption(groups, rng.randrange(NUM_TEMPLATES), rng.randrange(2)))
            context = min(rng.randint(2, 40), max_positions // 2)
            rows.append((codes(groups if rng.random() < 0.8 else None, context), tok(text + "\n").input_ids))
        L = max(len(c) + len(ids) for c, ids in rows)
        inputs = torch.zeros(batch_size, L, embed.embedding_dim)
        labels = torch.full((batch_size, L), -100)
        mask = torch.zeros(batch_size, L, dtype=torch.long)
        for b, (ctx, ids) in enumerate(rows):
            n = len(ctx) + len(ids)
            inputs[b, :len(ctx)] = ctx
            inputs[b, len(ctx):n] = embed(torch.tensor(ids))
            labels[b, len(ctx) + 1:n] = torch.tensor(ids[1:])  # BOS is given, the caption is predicted
            mask[b, :n] = 1
        loss = model(inputs_embeds=inputs, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sched.step()
        if step == 0 or step + 1 == steps:
            log.info("tiny LLM pre-training step %d/%d: LM loss %.3f", step + 1, steps, loss.item())
    model.eval()


def build_for_config(config: str, overrides: list[str]) -> Path | None:
    """Build the tiny LLM an experiment config asks for (``model.llm.build_if_missing``) into
    its ``model.llm.pretrained``; None when the config asks for none."""
    from pipeline.config import load_config

    model = load_config(config, overrides).model
    llm = getattr(model, "llm", None)
    if llm is None or not llm.build_if_missing:
        return None
    if llm.pretrained is None:
        raise ValueError("model.llm.build_if_missing: set model.llm.pretrained, the directory to build the LLM in")
    return build_tiny_llm(llm.pretrained, llm.config, steps=llm.build_steps, seed=model.frozen_init_seed,
                          tokenizer=llm.tokenizer)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["tokenizer"]:
        t = build_tiny_tokenizer()
        print(f"wrote {TINY_GPT2_TOKENIZER}: {len(t)} tokens")
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.tiny_llm",
        description="Build the tiny stand-in LLM of an EVLGen config (model.llm.build_if_missing) into "
                    "model.llm.pretrained, once; 'python -m data_prep.tiny_llm tokenizer' rewrites the "
                    "shipped tiny tokenizer.")
    parser.add_argument("--config", required=True, help="a shipped config name or a YAML path")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = build_for_config(args.config, args.overrides)
    print(f"tiny LLM: {out}" if out else f"tiny LLM: {args.config} builds none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
