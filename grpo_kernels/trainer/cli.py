"""``grpo-kernels train``: GRPO from the command line.

With no task arguments (no ``--model``/``--dataset``/``--config``) it runs the built-in CPU demo
(:mod:`grpo_kernels.trainer.demo`): a tiny random-init Llama learns to copy a digit string from rewards alone.

    grpo-kernels train                                   # the demo, writes ./grpo_demo_output/
    grpo-kernels train --model ./my-qwen --dataset math.jsonl --reward-funcs exact_answer --output-dir run1
    grpo-kernels train --config recipe.yaml --max-steps 50 --learning-rate 2e-6
    torchrun --nproc_per_node 2 -m grpo_kernels.cli train --dataset data.jsonl --model ./ckpt
    torchrun --nproc_per_node 8 -m grpo_kernels.cli train --dataset data.jsonl --model ./ckpt --fsdp   # sharded

Every :class:`~grpo_kernels.trainer.GRPOConfig` field is a flag (``--per-device-batch-size``, ``--loss-type`` ...);
flags override the config file, which overrides the defaults (the demo's tuned defaults for the demo). Options
must be spelled out (no prefix matching: ``--lr`` is an error, not ``--lr-scheduler``).

The output directory is guarded (see :meth:`GRPOTrainer.train`): a second run into one that holds a run is
refused unless ``--resume`` (continue the newest complete checkpoint) or ``--overwrite-output-dir`` is given.
Errors in the inputs (config file, ``--model``, dataset, checkpoint, output directory, reward functions) are one
line on stderr and exit code 2; ``--debug`` prints the traceback as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time


def _bool(v: str) -> bool:
    from .config import _coerce_scalar

    try:
        return _coerce_scalar(bool, v)
    except TypeError:
        raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}") from None


def _typed(typ):
    """An argparse type converting like the config files do (``1e3`` for an int field, ``1e-3`` for a float)."""
    from .config import _coerce_scalar

    def parse(v: str):
        try:
            return _coerce_scalar(typ, v)
        except TypeError:
            what = "an integer" if typ is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {v!r}") from None

    parse.__name__ = typ.__name__
    return parse


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
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the traceback too (by default: one line, exit code 2)")
    g = parser.add_argument_group("GRPOConfig fields (see grpo_kernels/trainer/config.py); a bare boolean "
                                  "flag means true (--overwrite-output-dir)")
    for f in dataclasses.fields(GRPOConfig):
        if f.name == "resume_from_checkpoint":
            continue
        flag = "--" + f.name.replace("_", "-")
        ft = GRPOConfig.field_type(f.name)
        typ = ft.base if ft.base is str else _typed(ft.base)
        if ft.base is bool:
            g.add_argument(flag, dest=f.name, type=_bool, nargs="?", const=True, default=None, metavar="BOOL")
        elif ft.is_list:
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
    _check_model_dir("--model", args.model)
    tok_path = args.tokenizer or args.model
    if args.tokenizer:
        _check_model_dir("--tokenizer", args.tokenizer, need_config=False)
    tok = _load(f"the tokenizer from {'--tokenizer' if args.tokenizer else '--model'} {tok_path!r}",
                AutoTokenizer.from_pretrained, tok_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model = _load(f"the model from --model {args.model!r}", AutoModelForCausalLM.from_pretrained, args.model)
    return model, tok, args.dataset, cfg


def _check_model_dir(flag: str, path: str, need_config: bool = True) -> None:
    if not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is not a local directory (nothing is downloaded)")
    if not os.listdir(path):
        raise ValueError(f"{flag} {path!r} is an empty directory (expected a Hugging Face model: config.json, "
                         f"weights, tokenizer files)")
    if need_config and not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{flag} {path!r} has no config.json: not a Hugging Face model directory "
                         f"(it holds {', '.join(sorted(os.listdir(path))[:5])})")


def _load(what: str, fn, path: str):
    try:
        return fn(path)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ... with long texts
        lines = str(e).strip().splitlines()
        raise ValueError(f"cannot load {what}: {type(e).__name__}: {lines[0] if lines else ''}") from e


def run(args) -> int:
    """``grpo-kernels train``. A bad input (config, model, dataset, checkpoint, output directory, reward function)
    is one line on stderr, ``grpo-kernels train: error: ...``, and exit code 2; ``--debug`` adds the traceback."""
    import traceback
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):  # warnings as one line each
        print(f"warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            return _run(args)
        except (ValueError, OSError) as e:
            if getattr(args, "debug", False):
                traceback.print_exc()
            text = " ".join(str(e).split()) or type(e).__name__
            hint = "" if getattr(args, "debug", False) else " (--debug shows the traceback)"
            print(f"grpo-kernels train: error: {text}{hint}", file=sys.stderr)
            return 2


def _run(args) -> int:
    from .data import GRPODataset
    from .trainer import GRPOTrainer

    overrides = _overrides(args)
    is_demo = not (args.model or args.dataset or args.config)
    if is_demo:
        model, tok, data, cfg = build_demo(args, overrides)
    else:
        model, tok, data, cfg = build_task(args, overrides)
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
              f"loss: {cfg.loss_type}, lr: {cfg.learning_rate}, output: {os.path.abspath(cfg.output_dir)}", flush=True)
        if ds.num_skipped:
            print(f"  skipped {ds.num_skipped} malformed rows (first: line {ds.skipped[0][0]}: {ds.skipped[0][1]})")
    trainer = GRPOTrainer(model, ds, cfg, tokenizer=tok)
    t0 = time.perf_counter()
    trainer.train()  # writes output_dir/config.json once it holds the directory
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
