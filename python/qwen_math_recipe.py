"""Recipe: GRPO on a local Qwen-style checkpoint with a JSONL math set, on one GPU (or several with torchrun).

Data: one JSON object per line, ``{"prompt": "What is 17 * 23? Think inside <think></think>, then answer as
\\boxed{n}.", "answer": "391"}`` (GSM8K-style sets convert
directly; ``answer`` is compared numerically with the last number / ``\\boxed{}`` / ``#### x`` of the completion).

    python python/qwen_math_recipe.py --model /models/Qwen2.5-0.5B-Instruct --dataset math.jsonl
    torchrun --nproc_per_node 4 python/qwen_math_recipe.py --model ... --dataset ...   # DDP, one GPU per rank

The same run from the CLI:

    grpo-kernels train --model /models/Qwen2.5-0.5B-Instruct --dataset math.jsonl --config recipe.yaml

Rewards: exact numeric answer (weight 1.0) + ``<think>…</think>`` format (0.2) + length penalty past 1024
characters (0.1). Loss: DAPO-style token-level clipped loss (``loss_type="dapo"``, ε=0.2/0.28), from the last
hidden states and the LM head (``fused_linear=True``: the [S, T, vocab] logits are never materialized).
Memory: for a 0.5B model, 8 prompts x 8 samples x 512 new tokens fits a 24 GB GPU with gradient checkpointing.
"""

import argparse
import os

import torch

from grpo_kernels.trainer.rewards import format_reward_func, length_penalty_func
from grpo_kernels.trainer import GRPOConfig, GRPODataset, GRPOTrainer

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local checkpoint directory (nothing is downloaded)")
    ap.add_argument("--dataset", required=True, help="JSONL with prompt/answer rows")
    ap.add_argument("--output-dir", default="grpo_qwen_math")
    ap.add_argument("--max-steps", type=int, default=500)
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    ap.add_argument("--overwrite-output-dir", action="store_true", help="replace an earlier run in --output-dir")
    ap.add_argument("--cpu-smoke-test", action="store_true",
                    help="run a few tiny CPU steps (fp32, 16 new tokens) to check the wiring, not to train")
    args = ap.parse_args()
    if not os.path.isdir(args.model):
        raise SystemExit(f"--model {args.model!r} must be a local directory")
    smoke = args.cpu_smoke_test
    if not torch.cuda.is_available() and not smoke:
        raise SystemExit("this recipe needs a CUDA GPU (try python/demo_digit_copy.py on a CPU)")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32 if smoke else torch.bfloat16)

    config = GRPOConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, seed=0,
        per_device_batch_size=8, num_generations=8, gradient_accumulation_steps=2,
        max_new_tokens=512, temperature=1.0, top_p=1.0, max_length=1024,
        loss_type="dapo", epsilon=0.2, epsilon_high=0.28, num_iterations=1, kl_coef=0.0,
        fused_linear=True, bf16=True, gradient_checkpointing=True,
        learning_rate=1e-6, warmup_steps=10, lr_scheduler="cosine", max_grad_norm=1.0, weight_decay=0.0,
        save_steps=50, resume_from_checkpoint="latest" if args.resume else None,
        overwrite_output_dir=args.overwrite_output_dir,
        reward_funcs=["exact_answer"], target_reward=None,
    )
    if smoke:
        config = config.replace(device="cpu", bf16=False, max_new_tokens=16, per_device_batch_size=2,
                                num_generations=4, max_steps=min(args.max_steps, 2), save_steps=0)
    rows = GRPODataset(args.dataset, tokenizer, num_samples=config.num_generations, max_length=config.max_length)
    rewards = ["exact_answer", format_reward_func(r"^\s*<think>.*?</think>.*\\boxed\{.+\}"), length_penalty_func(1024)]
    trainer = GRPOTrainer(model, rows, config, reward_funcs=rewards, tokenizer=tokenizer, reward_weights=[1.0, 0.2, 0.1])
    trainer.train()
    if trainer.is_main:
        print(trainer.summary())


if __name__ == "__main__":
    main()
