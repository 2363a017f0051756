"""``grpo-kernels train``: GRPO from the command line.

With no task arguments (no ``--model``/``--dataset``/``--config``) it runs the built-in CPU demo
(:mod:`grpo_kernels.trainer.demo`): a tiny random-init Llama learns to copy a digit string from rewards alone.

    grpo-kernels train                                   # the demo, writes ./grpo_demo_output/
    grpo-kernels train --model ./my-qwen --dataset math.jsonl --reward-funcs exact_answer --output-dir run1
    grpo-kernels train --config recipe.yaml --max-steps 50 --learning-rate 2e-6
    torchrun --nproc_per_node 2 -m grpo_kernels.cli train --dataset data.jsonl --model ./ckpt

Every :class:`~grpo_kernels.trainer.GRPOConfig` field is a flag (``--per-device-batch-size``, ``--loss-type`` ...);
flags override the config file, which overrides the defaults (the demo's tuned defaults for the demo).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time


def _field_type(f):
    """``(kind, element type)`` of a GRPOConfig field from its annotation: ``("list", float|str)``,
    ``("bool", None)`` or ``("scalar", int|float|str)`` (``Optional[...]`` is the inner type)."""
    s = str(f.type)  # the annotation text (config.py uses postponed annotations)
    if "List" in s or "list" in s:
        return "list", float if "float" in s else str
    if "bool" in s:
        return "bool", None
    if "int" in s:
        return "scalar", int
    if "float" in s:
        return "scalar", float
    return "scalar", str


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .config import GRPOConfig

    parser.add_argument("--config", metavar="FILE", help="YAML/JSON file of GRPOConfig fields (flags override it)")
    parser.add_argument("--model", metavar="LOCAL_PATH", help="local Hugging Face causal-LM directory (default: the demo model)")
    parser.add_argument("--tokenizer", metavar="LOCAL_PATH", help="tokenizer directory (default: --model)")
    parser.add_argument("--dataset", metavar="FILE.jsonl", help="JSONL rows: {prompt, answer} / {prompt, responses[, rewards]}")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                        help="continue from a checkpoint directory (default: the newest one in --output-dir)")
    parser.add_argument("--demo-digits", type=int, default=None, help="demo only: length of the digit string to copy")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    g = parser.add_argument_group("GRPOConfig fields (see grpo_kernels/trainer/config.py)")
    for f in dataclasses.fields(GRPOConfig):
        if f.name == "resume_from_checkpoint":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind, typ = _field_type(f)
        if kind == "bool":
            g.add_argument(flag, dest=f.name, type=_bool, default=None, metavar="BOOL")
        elif kind == "list":
            g.add_argument(flag, dest=f.name, type=typ, nargs="+", default=None)
        else:
            g.add_argument(flag, dest=f.name, type=typ, default=None)


def _overrides(args) -> dict:
    from .config import GRPOConfig

    out = {n: getattr(args, n) for n in GRPOConfig.field_names() if getattr(args, n, None) is not None}
    if args.resume:
        out["resume_from_checkpoint"] = args.resume
    return out


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def build_demo(args, overrides: dict):
    """(model, tokenizer, rows, config) of the built-in demo."""
    from . import demo
    from .config import GRPOConfig

    digits = args.demo_digits or demo.DEMO_NUM_DIGITS
    d = dict(demo.DEMO_DEFAULTS, max_new_tokens=digits + 1)  # the digits, then <eos>
    d.update(overrides)
    cfg = GRPOConfig.from_dict(d)
    tok = demo.build_tokenizer()
    model = demo.build_model(tok, seed=cfg.seed, **demo.DEMO_MODEL)
    rows = demo.make_copy_rows(demo.DEMO_NUM_PROMPTS, digits, seed=cfg.seed)
    return model, tok, rows, cfg


def build_task(args, overrides: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .config import GRPOConfig

    cfg = GRPOConfig.from_file(args.config, **overrides) if args.config else GRPOConfig.from_dict(overrides)
    if not args.model:
        raise ValueError("--model LOCAL_PATH is required with --dataset/--config (or run with no arguments for the demo)")
    if not args.dataset:
        raise ValueError("--dataset FILE.jsonl is required with --model")
    if not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model!r} is not a local directory (nothing is downloaded)")
    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model)
    return model, tok, args.dataset, cfg


def run(args) -> int:
    from .data import GRPODataset
    from .trainer import GRPOTrainer

    overrides = _overrides(args)
    is_demo = not (args.model or args.dataset or args.config)
    try:
        if is_demo:
            model, tok, data, cfg = build_demo(args, overrides)
        else:
            model, tok, data, cfg = build_task(args, overrides)
    except (ValueError, OSError) as e:
        print(f"grpo-kernels train: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    ds = GRPODataset(data, tok, num_samples=cfg.num_generations, max_length=cfg.max_length,
                     use_chat_template=cfg.use_chat_template, skip_invalid=cfg.skip_invalid_rows)
    if _is_rank0():
        what = "built-in demo: copy a digit string (random-init tiny Llama, CPU)" if is_demo else f"{args.model} on {args.dataset}"
        n_par = sum(p.numel() for p in model.parameters())
        print(f"GRPO {what}\n  model: {n_par / 1e6:.3f}M parameters; dataset: {ds!r}\n"
              f"  steps: {cfg.max_steps}, prompts/step/process: {cfg.per_device_batch_size}, G: {cfg.num_generations}, "
              f"loss: {cfg.loss_type}, lr: {cfg.learning_rate}, output: {os.path.abspath(cfg.output_dir)}")
        if ds.num_skipped:
            print(f"  skipped {ds.num_skipped} malformed rows (first: line {ds.skipped[0][0]}: {ds.skipped[0][1]})")
    trainer = GRPOTrainer(model, ds, cfg, tokenizer=tok)
    if _is_rank0():
        os.makedirs(cfg.output_dir, exist_ok=True)
        cfg.save(os.path.join(cfg.output_dir, "config.json"))
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    if _is_rank0():
        s = trainer.summary()
        print(f"\nsummary: {s['steps']} steps in {wall:.1f} s wall "
              f"(training {s['elapsed_s']:.1f} s)")
        print(f"  mean reward: first 10 steps {s['reward_first10']:.3f} -> last 10 steps {s['reward_last10']:.3f} "
              f"(best step {s['reward_best']:.3f})")
        if s["target_reached"]:
            t = s["target_reached"]
            print(f"  reached {cfg.target_reward} (10-step mean) at step {t['step']} after {t['elapsed']:.1f} s")
        elif cfg.target_reward is not None:
            print(f"  did not reach {cfg.target_reward} (10-step mean) within {s['steps']} steps")
        print(f"  metrics: {os.path.join(s['output_dir'], 'metrics.jsonl')}")
        if cfg.save_final:
            print(f"  final model: {os.path.join(s['output_dir'], 'final')}")
        if s["plot"]:
            print(f"  reward curve: {s['plot']}")
    return 0
