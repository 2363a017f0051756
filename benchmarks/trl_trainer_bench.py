"""TRL's ``GRPOTrainer`` vs ``grpo_kernels.integrations.trl.GRPOTrainer`` on the same tiny model, CPU.

For each completion length C × vocabulary V (same random-init Llama, same batch, fp32) it measures, for plain
TRL 1.16 and for TRL + grpo_kernels:

* ``loss fwd+bwd``: ``trainer.compute_loss(model, inputs)`` + ``backward()`` on one prepared micro-batch (old and
  reference log-probs present: the off-policy schedule, dapo, KL on) -- the stage that touches the LM head with
  grad;
* ``no-grad log-probs``: ``trainer._get_per_token_logps_and_entropies`` under ``torch.no_grad`` (the old-policy /
  reference pass of ``_generate_and_score_completions``);
* ``train step``: ``trainer.train()`` for a few optimizer steps (generation of exactly C tokens with
  ``min_new_tokens``, the reference pass, the loss, the optimizer), TRL's own ``step_time`` metric (mean over the
  steps after the first) and the peak over the whole run.

Time: median of the timed rounds (``grpo_kernels.bench.harness.time_cpu``). Peak memory: the process's RSS
high-water mark around one call beyond what was resident before it (``harness.cpu_peak_extra``: ``VmHWM`` reset
through ``/proc/self/clear_refs``, heap trimmed first), on a call that is never the first (parameter gradients
already allocated and kept). Writes ``results.json`` and ``results.md`` to ``--output-dir``.

    python benchmarks/trl_trainer_bench.py --output-dir benchmarks/results/cpu-amd-epyc-2vcpu/trl_trainer
    python benchmarks/trl_trainer_bench.py --quick            # tiny shapes, seconds (a smoke run)

Nothing is downloaded: the model and a word-level tokenizer of V tokens are built in code.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from grpo_kernels.bench import harness as H  # noqa: E402
from grpo_kernels.bench import report as R  # noqa: E402

MB = 2 ** 20


def build_tokenizer(vocab_size: int):
    """Word-level tokenizer over ``t0 … t{V-5}`` plus ``<pad> <bos> <eos> <unk>``: every id the model can sample
    decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"t{i}" for i in range(vocab_size - 4)]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def build_model(path: str, tok, vocab_size: int, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)


def reward(prompts, completions, **kwargs):
    return [float(len(set(c.split()))) for c in completions]


def make_trainer(impl: str, model_path: str, tok, out_dir: str, C: int, batch: int, G: int, max_steps: int,
                 extra=None):
    import datasets
    import trl
    from transformers import logging as hf_logging

    from grpo_kernels.integrations.trl import GRPOTrainer

    hf_logging.set_verbosity_error()
    args = trl.GRPOConfig(output_dir=out_dir, report_to=[], use_cpu=True, bf16=False, seed=0, disable_tqdm=True,
                          per_device_train_batch_size=batch, num_generations=G, max_completion_length=C,
                          generation_kwargs={"min_new_tokens": C}, loss_type="dapo", beta=0.04, max_steps=max_steps,
                          logging_steps=1, save_strategy="no", learning_rate=1e-4, gradient_checkpointing=False)
    prompts = [" ".join(f"t{(7 * i + j) % 97}" for j in range(6)) for i in range(64)]
    ds = datasets.Dataset.from_dict({"prompt": prompts})
    cls = trl.GRPOTrainer if impl == "trl" else GRPOTrainer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model=model_path, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                   **(extra or {}))


def synthetic_inputs(trainer, tok, batch: int, P: int, C: int, V: int, seed: int = 0):
    """A micro-batch as ``_generate_and_score_completions`` returns it: left-padded prompts, completions of varied
    length (C/2 … C), advantages, the current log-probs + noise as old and reference log-probs."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(4, V, (batch, P), generator=g)
    prompt_mask = torch.ones(batch, P, dtype=torch.long)
    completion_ids = torch.randint(4, V, (batch, C), generator=g)
    lengths = torch.randint(C // 2, C + 1, (batch,), generator=g)
    completion_mask = (torch.arange(C)[None, :] < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tok.pad_token_id)
    ids = torch.cat([prompt_ids, completion_ids], 1)
    am = torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        cur, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, C)
    noise = lambda s: s * torch.randn(batch, C, generator=g) * completion_mask  # noqa: E731
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, advantages=torch.randn(batch, generator=g),
                num_items_in_batch=completion_mask.sum(), old_per_token_logps=cur + noise(0.1),
                ref_per_token_logps=cur + noise(0.1))


def _interleaved_times(fns: dict, rounds: int) -> dict:
    """Median ms per implementation, the rounds interleaved (impl A, B, C, A, B, C, ...) so that a load change on
    the shared machine hits every implementation alike; one untimed warm-up call each."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: dict(time_ms=statistics.median(v), min_ms=min(v), max_ms=max(v), rounds=len(v))
            for k, v in times.items()}


def _loadavg():
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except OSError:
        return None


def bench_shape(model_path, tok, tmp, C, V, batch, G, P, train_steps, rounds, small_chunk):
    """Every stage of one (C, V) for every implementation, on the same prepared micro-batch."""
    impls = {"trl": ("trl", {}), "grpo_kernels": ("ours", {})}
    if small_chunk:
        impls[f"grpo_kernels chunk={small_chunk}"] = ("ours", dict(chunk_size=small_chunk))
    trainers = {name: make_trainer(kind, model_path, tok, os.path.join(tmp, f"{kind}-{C}-{V}-{i}"), C, batch, G,
                                   train_steps, extra)
                for i, (name, (kind, extra)) in enumerate(impls.items())}
    for t in trainers.values():
        t.model.train()
        t.current_gradient_accumulation_steps = 1
    inputs = synthetic_inputs(trainers["trl"], tok, batch, P, C, V)  # one batch for all (TRL's log-probs)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    n_tokens = int(inputs["completion_mask"].sum())

    def loss_step(t):
        def fn():
            t.model.zero_grad(set_to_none=False)  # parameter gradients stay allocated (not counted in the peak)
            t.compute_loss(t.model, inputs).backward()
        return fn

    def logps(t):
        def fn():
            with torch.no_grad():
                return t._get_per_token_logps_and_entropies(t.model, ids, am, C, batch_size=batch)
        return fn

    rows = []
    for stage, make in (("loss fwd+bwd", loss_step), ("no-grad log-probs", logps)):
        fns = {name: make(t) for name, t in trainers.items()}
        load = _loadavg()
        timing = _interleaved_times(fns, rounds)
        for name, fn in fns.items():
            rows.append(dict(impl=name, stage=stage, C=C, V=V, batch=batch, prompt_len=P, completion_tokens=n_tokens,
                             dtype="float32", peak_extra_bytes=H.cpu_peak_extra(fn), loadavg_1min=load,
                             **timing[name]))
    if train_steps > 0:  # generation-dominated (the same TRL code for both): reported for the peak over a step
        for name in ("trl", "grpo_kernels"):
            t = trainers[name]
            t.model.zero_grad(set_to_none=True)
            load = _loadavg()
            t0 = time.perf_counter()
            peak = H.cpu_peak_extra(t.train)
            wall = time.perf_counter() - t0
            step_times = [r["step_time"] for r in t.state.log_history if "step_time" in r]
            later = step_times[1:] or step_times
            lengths = [r["completions/mean_length"] for r in t.state.log_history if "completions/mean_length" in r]
            rows.append(dict(impl=name, stage="train step", C=C, V=V, batch=batch, prompt_len=P,
                             completion_tokens=batch * C, dtype="float32", time_ms=1e3 * statistics.median(later),
                             rounds=len(later), peak_extra_bytes=peak, train_steps=train_steps, train_wall_s=wall,
                             mean_completion_length=statistics.mean(lengths) if lengths else None,
                             loadavg_1min=load))
    del trainers
    H.release_memory("cpu")
    return rows


def markdown(meta, rows):
    lines = ["# TRL 1.16 `GRPOTrainer` vs TRL + grpo_kernels (`grpo_kernels.integrations.trl.GRPOTrainer`)", "",
             f"Device: {meta['device_name']}, {meta['torch_threads']} torch threads; torch {meta['torch']}, "
             f"trl {meta['peers'].get('trl')}, transformers {meta['transformers']}; commit `{meta['git_commit'][:7]}`"
             f"{' (kernel sources modified)' if meta.get('git_dirty') else ''}; {meta['date']}; load average at "
             f"start {meta.get('loadavg_at_start')}.", "",
             f"Model: random-init Llama, hidden {meta['hidden']}, {meta['layers']} layers, untied LM head, fp32. "
             f"Batch: {meta['batch']} sequences (groups of {meta['num_generations']}), prompt {meta['prompt_len']} "
             "tokens, completions of C/2 … C tokens (loss and no-grad rows) or exactly C (train rows). "
             "Loss: dapo, beta = 0.04 (reference log-probs), old log-probs present. "
             "Time: median; peak: RSS high-water mark beyond what was resident before the call (MiB).", "",
             "Time columns: median [min–max] over interleaved rounds, ms; speedup = TRL median / ours median. "
             "`ours` = default chunk (about 64 MiB of logits); `ours/chunk` = the same with a fixed `chunk_size` "
             "(memory only depends on it).", "",
             "How TRL 1.16 computes these on CPU (`trl.trainer.utils.add_fused_lm_head` → `ChunkedLogProbFunction`): "
             "without Triton it scores *every* position of prompt + completion (not only the completion tokens), "
             "in tiles of 4,096 tokens × 32,768 vocabulary entries, with several fp32 temporaries per tile; its "
             "peak therefore grows with min(B·(P+C), 4096) × min(V, 32768) and is capped there. Ours builds only "
             "the completion rows' logits, `chunk_size` rows at a time.", "",
             "| stage | C | V | completion tokens | TRL time | ours time | speedup | TRL peak MiB | ours peak MiB | "
             "ours/chunk peak MiB | TRL / ours peak |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in rows:
        by.setdefault((r["stage"], r["C"], r["V"]), {})[r["impl"]] = r
    order = {"loss fwd+bwd": 0, "no-grad log-probs": 1, "train step": 2}

    def t_(r):
        if "min_ms" in r:
            return f"{r['time_ms']:.0f} [{r['min_ms']:.0f}–{r['max_ms']:.0f}]"
        return f"{r['time_ms']:.0f}"

    for k in sorted(by, key=lambda k: (order[k[0]], k[1], k[2])):
        t, o = by[k].get("trl"), by[k].get("grpo_kernels")
        small = [r for name, r in by[k].items() if name.startswith("grpo_kernels chunk=")]
        if not (t and o):
            continue
        sp = t["time_ms"] / o["time_ms"] if o["time_ms"] else float("nan")
        pr = t["peak_extra_bytes"] / o["peak_extra_bytes"] if o["peak_extra_bytes"] else float("nan")
        sc = f"{small[0]['peak_extra_bytes'] / MB:.0f}" if small else "–"
        lines.append(f"| {k[0]} | {k[1]} | {k[2]:,} | {t['completion_tokens']} | {t_(t)} | {t_(o)} | {sp:.2f}× | "
                     f"{t['peak_extra_bytes'] / MB:.0f} | {o['peak_extra_bytes'] / MB:.0f} | {sc} | {pr:.1f}× |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", default=os.path.join(ROOT, "benchmarks", "results", "cpu-amd-epyc-2vcpu",
                                                          "trl_trainer"))
    ap.add_argument("--completion-lengths", default="64,256")
    ap.add_argument("--vocab-sizes", default="16384,65536")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--num-generations", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=2,
                    help="optimizer steps of the train-step rows (0 = skip); the first is not timed")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per stage and implementation")
    ap.add_argument("--small-chunk", type=int, default=256,
                    help="also run ours with this chunk_size (0 = skip): the memory with a fixed chunk")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one round (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.completion_lengths, args.vocab_sizes, args.train_steps = "8,16", "256,512", 2
    ok, why = H.cpu_hwm_supported()
    if not ok:
        raise SystemExit(f"cannot measure peak memory here: {why}")
    import transformers

    Cs = [int(x) for x in args.completion_lengths.split(",")]
    Vs = [int(x) for x in args.vocab_sizes.split(",")]
    meta = R.run_metadata("cpu", copy_bw_gbps=None, cold_l2=False, quick=args.quick, argv=sys.argv)
    meta.update(transformers=transformers.__version__, hidden=args.hidden, layers=args.layers, batch=args.batch,
                num_generations=args.num_generations, prompt_len=args.prompt_len)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for V in Vs:
            tok = build_tokenizer(V)
            model_path = os.path.join(tmp, f"model-{V}")
            build_model(model_path, tok, V, args.hidden, args.layers)
            for C in Cs:
                t0 = time.perf_counter()
                new = bench_shape(model_path, tok, tmp, C, V, args.batch, args.num_generations, args.prompt_len,
                                  args.train_steps, 1 if args.quick else args.rounds, args.small_chunk)
                rows += new
                for r in new:
                    print(f"{r['impl']:24s} C={C:4d} V={V:6d} {r['stage']:18s} {r['time_ms']:9.1f} ms "
                          f"{r['peak_extra_bytes'] / MB:8.1f} MiB", flush=True)
                print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(markdown(meta, rows))
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
