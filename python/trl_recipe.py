"""Recipe: TRL's GRPO trainer with grpo_kernels' loss (``grpo_kernels.integrations.trl.GRPOTrainer``).

The trainer is ``trl.GRPOTrainer`` (TRL 1.16.x, ``pip install 'grpo_kernels[trl]'``) with the per-token log-probs
and the loss computed from the last hidden states and the LM head in chunks (the ``[B, T, vocab]`` logits are
never built); the config is TRL's own ``GRPOConfig``, and every loss option maps one to one. Swap the import to
compare with plain TRL (``--trl-baseline``).

Data: JSONL, one ``{"prompt": "...", "answer": "..."}`` per line (the answer is compared numerically with the
last number / ``\\boxed{}`` / ``#### x`` of the completion).

    python python/trl_recipe.py --model /models/Qwen2.5-0.5B-Instruct --dataset math.jsonl --bf16
    accelerate launch --num_processes 4 python/trl_recipe.py --model ... --dataset ... --bf16   # DDP
    python python/trl_recipe.py --smoke          # CPU: a tiny random Qwen2 on the digit-copy task, 2 steps

Nothing is downloaded: ``--model`` is a local directory; ``--smoke`` builds its model and tokenizer in code.
"""

from __future__ import annotations

import argparse
import os


def _smoke_setup(out_dir):
    """A tiny random-init Qwen2 (tied embeddings) saved under ``out_dir`` and the digit-copy task, built in code."""
    import datasets
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grpo_kernels.trainer.demo import build_tokenizer, make_copy_rows

    tok = build_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    path = os.path.join(out_dir, "tiny_model")
    Qwen2ForCausalLM(cfg).save_pretrained(path)  # TRL loads the reference model (beta > 0) from a path
    tok.save_pretrained(path)
    rows = make_copy_rows(64, seed=0)
    return path, tok, datasets.Dataset.from_list(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="local checkpoint directory")
    ap.add_argument("--dataset", help="JSONL with prompt/answer rows")
    ap.add_argument("--output-dir", default="grpo_trl_recipe")
    ap.add_argument("--max-steps", type=int, default=500)
    ap.add_argument("--loss-type", default="dapo", help="TRL loss_type (grpo, bnpo, dr_grpo, dapo, cispo, sapo, "
                                                        "luspo, vespo)")
    ap.add_argument("--beta", type=float, default=0.0, help="TRL's KL coefficient (> 0 loads a reference model)")
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--per-device-batch-size", type=int, default=8, help="completions per device per micro-batch")
    ap.add_argument("--gradient-accumulation-steps", type=int, default=2)
    ap.add_argument("--max-completion-length", type=int, default=512)
    ap.add_argument("--learning-rate", type=float, default=1e-6)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--chunk-size", type=int, default=None, help="completion rows of logits built at a time")
    ap.add_argument("--trl-baseline", action="store_true", help="plain trl.GRPOTrainer, for comparison")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU wiring check: tiny random Qwen2, digit-copy task, 2 steps (no --model/--dataset)")
    args = ap.parse_args(argv)

    import trl

    from grpo_kernels.integrations.trl import GRPOTrainer
    from grpo_kernels.trainer.rewards import digit_copy_reward, exact_answer_reward, format_reward_func

    os.makedirs(args.output_dir, exist_ok=True)
    if args.smoke:
        model, tokenizer, train = _smoke_setup(args.output_dir)
        rewards = [digit_copy_reward]
        overrides = dict(use_cpu=True, bf16=False, max_steps=2, num_generations=4, per_device_train_batch_size=8,
                         gradient_accumulation_steps=2, max_completion_length=4, beta=0.04, num_iterations=2,
                         learning_rate=1e-3, gradient_checkpointing=False, disable_tqdm=True)
    else:
        if not (args.model and args.dataset):
            ap.error("--model and --dataset are required (or --smoke)")
        if not os.path.isdir(args.model):
            ap.error(f"--model {args.model!r} must be a local directory")
        import datasets
        from transformers import AutoTokenizer

        model = args.model
        tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
        train = datasets.load_dataset("json", data_files=args.dataset, split="train")
        rewards = [exact_answer_reward, format_reward_func(r"^\s*<think>.*?</think>.*\\boxed\{.+\}")]
        overrides = dict(bf16=args.bf16, max_steps=args.max_steps, num_generations=args.num_generations,
                         per_device_train_batch_size=args.per_device_batch_size,
                         gradient_accumulation_steps=args.gradient_accumulation_steps,
                         max_completion_length=args.max_completion_length, beta=args.beta,
                         learning_rate=args.learning_rate, reward_weights=[1.0, 0.2],
                         model_init_kwargs={"dtype": "bfloat16"} if args.bf16 else None)

    config = trl.GRPOConfig(output_dir=args.output_dir, report_to=[], loss_type=args.loss_type, epsilon=0.2,
                            epsilon_high=0.28, temperature=1.0, logging_steps=1, save_strategy="no", seed=0,
                            **overrides)
    trainer_cls = trl.GRPOTrainer if args.trl_baseline else GRPOTrainer
    extra = {} if args.trl_baseline else dict(chunk_size=args.chunk_size)
    trainer = trainer_cls(model=model, reward_funcs=rewards, args=config, train_dataset=train,
                          processing_class=tokenizer, **extra)
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
