"""Evaluate a trained run.

    python -m pipeline.eval retrieval --run RUN_DIR [--checkpoint PATH] [--shards SPEC] [--k-test K]
    python -m pipeline.eval caption --run RUN_DIR [--checkpoint PATH] [--shards SPEC] [--num-beams N] ...
    python -m pipeline.eval vqa --run RUN_DIR [--checkpoint PATH] [--shards SPEC] [--prompt "Question: {} Short answer:"] ...
    python -m pipeline.eval classify --run RUN_DIR [--checkpoint PATH] [--shards SPEC]
    python -m pipeline.eval vqa-score --questions Q.json --annotations A.json --results R.json [--json]

Reads ``RUN_DIR/config.yaml``, loads the newest complete checkpoint (or ``--checkpoint``),
evaluates on ``--shards`` (default: the config's ``eval.shards``), prints the table, writes
``eval.json`` into the run directory and the scores to its TensorBoard (captioning also adds a
few images with their generated and reference captions, and writes every caption to
``captions.json``; ``vqa`` writes every answer to ``vqa_results.json`` in the official submission
format ``[{"question_id", "answer"}]``). ``vqa-score`` needs no run: it scores an official-format results file against
the official VQAv2 / OK-VQA questions and annotations (``pipeline.eval.vqa_metric``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

import torch

from pipeline.config import ConfigError, load_config
from pipeline.data.shards import allow_pipe_shards, check_shard_spec
from pipeline.device import pick_device
from pipeline.eval.tasks import check_contract, evaluation
from pipeline.models import build_model
from pipeline.models.weights import CheckpointError, load_weights, read_meta


def _open_run(args):
    """``--run`` (and ``--shards``) -> ``(run dir, its config, evaluation shards, device)``."""
    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise SystemExit(f"error: --run {run}: no config.yaml (is this a run directory?)")
    # a run directory may come from elsewhere: its config's ``imports:`` would run code; only
    # modules named on this command line (--import) are imported
    for module in args.imports:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"--import {module}: {err}") from err
    cfg = load_config(run / "config.yaml", run_imports=False)
    shards = args.shards or cfg.eval.shards
    if not shards:
        raise SystemExit("error: no evaluation shards: pass --shards or set eval.shards in the run's config")
    check_shard_spec(shards, "--shards" if args.shards else f"eval.shards (in {run / 'config.yaml'})")
    return run, cfg, shards, pick_device(args.device)


def _build(cfg, task: str):
    """The run's model as built before training, refused unless it provides what ``task`` calls."""
    model = build_model(cfg.model)
    check_contract(model, task, cfg.model.name)
    return model


def _load_trained(cfg, args, run: Path, device: torch.device):
    """The run's model with the newest complete checkpoint (or ``--checkpoint``): ``(model, tag dir, step)``."""
    model = _build(cfg, args.task)
    tag_dir = load_weights(model, args.checkpoint or run)
    model.to(device).eval()
    return model, tag_dir, int(read_meta(tag_dir).get("step", 0))


def _tensorboard(run: Path, step: int, metrics: dict, rows: list[dict] = ()) -> None:
    """The float scores as ``eval/*`` scalars in the run's TensorBoard at ``step``, and for each
    row with an image, the image with its generated and reference captions."""
    from torch.utils.tensorboard import SummaryWriter

    from pipeline.data.transforms import denormalize

    with SummaryWriter(str(run / "tensorboard")) as writer:
        for key, value in metrics.items():
            if isinstance(value, float):
                writer.add_scalar(f"eval/{key}", value, step)
        for i, r in enumerate(row for row in rows if row.get("image") is not None):
            writer.add_image(f"eval/caption_{i}", denormalize(r["image"][None].float())[0], step)
            writer.add_text(f"eval/caption_{i}", f"**generated:** {r['caption']}\n\n**references:** "
                            + " | ".join(r["references"]), step)


def _retrieval(args) -> int:
    task = evaluation(args.task)
    run, cfg, shards, device = _open_run(args)
    model, tag_dir, step = _load_trained(cfg, args, run, device)
    metrics = task.evaluate_shards(model, shards, image_size=cfg.data.image_size, batch_size=args.batch_size,
                              k_test=args.k_test or cfg.eval.k_test, max_words=cfg.data.max_words, device=device)
    metrics.update(checkpoint=str(tag_dir), step=step, shards=shards)
    out = Path(args.out) if args.out else run / "eval.json"
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    _tensorboard(run, step, metrics)
    print(task.format_table(metrics))
    ratio = metrics["txt_r1"] / metrics["chance_txt_r1"], metrics["img_r1"] / metrics["chance_img_r1"]
    print(f"R@1 is {ratio[0]:.1f}x chance for text retrieval and {ratio[1]:.1f}x chance for image retrieval "
          f"(checkpoint {tag_dir.name}, step {step}); written to {out}")
    return 0


def _caption(args) -> int:
    task = evaluation(args.task)
    run, cfg, shards, device = _open_run(args)
    generate = dict(prompt=args.prompt, max_new_tokens=args.max_new_tokens, min_length=args.min_length,
                    num_beams=args.num_beams)
    common = dict(image_size=cfg.data.image_size, batch_size=args.batch_size, max_words=cfg.data.max_words,
                  device=device, limit=args.limit, **generate)

    baseline = None
    if args.compare_untrained:  # the same model as training starts it: seeded like the trainer
        torch.manual_seed(cfg.train.seed)
        untrained = _build(cfg, args.task).to(device).eval()
        baseline, _ = task.evaluate_shards(untrained, shards, **common)
        del untrained
    model, tag_dir, step = _load_trained(cfg, args, run, device)
    metrics, rows = task.evaluate_shards(model, shards, **common)
    out = dict(metrics, checkpoint=str(tag_dir), step=step, shards=shards,
               generate=dict(model.caption_defaults)
               | {k: v for k, v in generate.items() if v is not None},
               examples=[{k: r[k] for k in ("key", "caption", "references")} for r in rows[:10]])
    if baseline is not None:
        out["untrained"] = baseline
    path = Path(args.out) if args.out else run / "eval.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    (path.parent / "captions.json").write_text(json.dumps(
        [{"image_id": r["key"], "caption": r["caption"]} for r in rows], indent=1) + "\n")
    _tensorboard(run, step, metrics, rows)
    print(task.format_table(metrics, baseline))
    for r in rows[:3]:
        print(f"  {r['key']}: {r['caption']!r}  (reference: {r['references'][0]!r})")
    print(f"checkpoint {tag_dir.name}, step {step}; written to {path}")
    return 0


def _classify(args) -> int:
    task = evaluation(args.task)
    run, cfg, shards, device = _open_run(args)
    model, tag_dir, step = _load_trained(cfg, args, run, device)
    metrics = task.evaluate_shards(model, shards, image_size=cfg.data.image_size, batch_size=args.batch_size,
                                   device=device)
    metrics.update(checkpoint=str(tag_dir), step=step, shards=shards)
    out = Path(args.out) if args.out else run / "eval.json"
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    _tensorboard(run, step, {k: v for k, v in metrics.items() if k in ("accuracy", "chance")})
    print(task.format_table(metrics))
    print(f"checkpoint {tag_dir.name}, step {step}; written to {out}")
    return 0


def _vqa(args) -> int:
    from pipeline.eval import vqa
    from pipeline.eval.vqa_files import write_results

    task = evaluation(args.task)
    run, cfg, shards, device = _open_run(args)
    model, tag_dir, step = _load_trained(cfg, args, run, device)
    generate = dict(prompt=args.prompt, max_new_tokens=args.max_new_tokens, min_length=args.min_length,
                    num_beams=args.num_beams, length_penalty=args.length_penalty, k_test=args.k_test)
    vqa.prepare(model, cfg.data.train_shards)
    metrics, rows = task.evaluate_shards(model, shards, image_size=cfg.data.image_size, batch_size=args.batch_size,
                                         device=device, limit=args.limit, **generate)
    chance = _chance(rows)
    out = dict(metrics, chance=chance, checkpoint=str(tag_dir), step=step, shards=shards,
               generate=vqa.settings(model, generate),
               examples=[{k: r[k] for k in ("question_id", "question", "answer", "answers")} for r in rows[:10]])
    path = Path(args.out) if args.out else run / "eval.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    results = path.parent / "vqa_results.json"
    write_results(results, {r["question_id"]: r["answer"] for r in rows})
    scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
    scalars.update({f"accuracy_{t}": a for t, a in metrics.get("per_answer_type", {}).items()})
    _tensorboard(run, step, {f"vqa_{k}": v for k, v in scalars.items()})
    print(task.format_table(metrics, chance))
    for r in rows[:3]:
        print(f"  {r['question']!r} -> {r['answer']!r}  (answers: {r['answers'][:3]})")
    print(f"checkpoint {tag_dir.name}, step {step}; written to {path} and {results}")
    return 0


def _chance(rows: list[dict]) -> float | None:
    """Share of the questions the most frequent human answer (each question's first) gets right:
    what answering one word to everything scores, in [0, 1]; None without answers."""
    from collections import Counter

    from pipeline.eval.vqa_metric import normalize_answer

    firsts = Counter(normalize_answer(r["answers"][0]) for r in rows if r["answers"])
    return max(firsts.values()) / sum(firsts.values()) if firsts else None


def _vqa_score(args) -> int:
    from pipeline.eval.vqa_files import load_official, load_results
    from pipeline.eval.vqa_metric import score

    questions = load_official(args.questions, args.annotations)
    answers = load_results(args.results)
    try:
        metrics = score(answers, questions)
    except ValueError as err:  # which questions are missing or unknown: name the results file too
        raise ValueError(f"{args.results}: {err}") from None
    print(f"VQA accuracy over {metrics['num_questions']} questions: {metrics['overall']:.2f}")
    for answer_type, accuracy in metrics["per_answer_type"].items():
        print(f"  {answer_type:<12} {accuracy:6.2f}")
    if args.json:
        print(json.dumps({"overall": metrics["overall"], "per_answer_type": metrics["per_answer_type"]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    run = argparse.ArgumentParser(add_help=False)  # what every evaluation takes
    run.add_argument("--run", required=True, help="run directory (holds config.yaml and checkpoints/)")
    run.add_argument("--checkpoint", help="checkpoint tag directory or checkpoints dir (default: newest in --run)")
    run.add_argument("--device", default=None)
    run.add_argument("--out", default=None, help="metrics JSON (default: RUN/eval.json)")
    run.add_argument("--allow-pipe-shards", action="store_true",
                     help="let pipe:CMD shard specs run CMD in a shell (refused otherwise; never set by a config)")
    run.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                     help="import MODULE first (an out-of-tree model registering itself); the run's own "
                          "config 'imports:' are never executed")
    sub = parser.add_subparsers(dest="task", required=True)
    ret = sub.add_parser("retrieval", parents=[run], help="zero-shot image-text retrieval (TR/IR R@1/5/10)")
    ret.add_argument("--shards", help="evaluation shards (brace pattern or data_prep directory)")
    ret.add_argument("--k-test", type=int, default=None, help="ITC top-k re-ranked by ITM (default: config)")
    ret.add_argument("--batch-size", type=int, default=64)
    cap = sub.add_parser("caption", parents=[run],
                         help="captioning: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap)")
    cap.add_argument("--shards", help="evaluation shards with reference captions in KEY.json (default: config)")
    cap.add_argument("--prompt", default=None, help="text prompt after the soft prompts (default: the model's)")
    cap.add_argument("--max-new-tokens", type=int, default=None)
    cap.add_argument("--min-length", type=int, default=None, help="minimum generated tokens")
    cap.add_argument("--num-beams", type=int, default=None)
    cap.add_argument("--batch-size", type=int, default=32)
    cap.add_argument("--limit", type=int, default=None, help="caption at most this many samples")
    cap.add_argument("--compare-untrained", action="store_true",
                     help="also score the model as training starts it (connector untrained), stored as 'untrained'")
    zs = sub.add_parser("vqa", parents=[run], help="VQA: zero-shot (EVLGen) or fine-tuned (ALBEF, BLIP); "
                                                    "VQAv2 / OK-VQA accuracy, GQA exact match")
    zs.add_argument("--shards", help="VQA shards from data_prep vqav2 / okvqa / gqa / synthetic_vqa (default: config)")
    zs.add_argument("--prompt", default=None, help='template with one {} for the question (default: the model\'s, '
                                                    '"Question: {} Short answer:")')
    zs.add_argument("--max-new-tokens", type=int, default=None)
    zs.add_argument("--min-length", type=int, default=None, help="minimum generated tokens")
    zs.add_argument("--num-beams", type=int, default=None)
    zs.add_argument("--length-penalty", type=float, default=None, help="beam score length exponent (< 0: shorter)")
    zs.add_argument("--k-test", type=int, default=None,
                    help="a ranking model's (ALBEF) candidates re-ranked by answer likelihood (default: its config)")
    zs.add_argument("--batch-size", type=int, default=32)
    zs.add_argument("--limit", type=int, default=None, help="answer at most this many questions")
    cls = sub.add_parser("classify", parents=[run], help="accuracy of a fine-tuned classifier (SNLI-VE) beside chance")
    cls.add_argument("--shards", help="task shards with the label in KEY.json (default: config)")
    cls.add_argument("--batch-size", type=int, default=64)
    vqa = sub.add_parser("vqa-score", help="score a VQAv2 / OK-VQA results file (official accuracy, x100)",
                         description="Score [{question_id, answer}] against the official questions and annotations "
                                     "JSON: overall and per-answer-type accuracy (vqaEval.py's normalisation, "
                                     "min(matches/3, 1) over the 10 leave-one-out subsets).")
    vqa.add_argument("--questions", required=True, help="questions JSON (v2_OpenEnded_mscoco_val2014_questions.json)")
    vqa.add_argument("--annotations", required=True, help="annotations JSON (v2_mscoco_val2014_annotations.json)")
    vqa.add_argument("--results", required=True, help="results JSON [{question_id, answer}], every question once")
    vqa.add_argument("--json", action="store_true",
                     help='end with one line {"overall": float, "per_answer_type": {...}}')
    vqa.set_defaults(allow_pipe_shards=False)  # reads no shards
    args = parser.parse_args(argv)
    allow_pipe_shards(args.allow_pipe_shards)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return {"retrieval": _retrieval, "caption": _caption, "vqa": _vqa, "classify": _classify,
                "vqa-score": _vqa_score}[args.task](args)
    except (ConfigError, FileNotFoundError, ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
