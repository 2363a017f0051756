"""The built-in demo of `grpo-kernels train`, spelled out with the Python API.

A 2-layer Llama (hidden 64, ~0.1M parameters) with random weights learns, from rewards alone, to copy a
3-digit string: prompt ``<bos>471=`` -> completion ``471<eos>``. The reward gives per-position credit,
``#{i : completion[i] == answer[i]} / max(len(answer), len(completion))``; a random policy scores ~0.07.

    python python/demo_digit_copy.py                 # ~20-40 s on a 2-core CPU
    python python/demo_digit_copy.py --seed 1 --digits 4 --max-steps 400
"""

import argparse

from grpo_kernels.trainer.demo import DEMO_DEFAULTS, DEMO_MODEL, build_model, build_tokenizer, make_copy_rows
from grpo_kernels.trainer.rewards import digit_copy_reward
from grpo_kernels.trainer import GRPOConfig, GRPODataset, GRPOTrainer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--digits", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=DEMO_DEFAULTS["max_steps"])
    ap.add_argument("--output-dir", default="grpo_demo_script_output")
    ap.add_argument("--overwrite-output-dir", action="store_true", help="replace an earlier run in --output-dir")
    args = ap.parse_args()

    tokenizer = build_tokenizer()  # character level, built in code
    model = build_model(tokenizer, seed=args.seed, **DEMO_MODEL)  # random init
    rows = make_copy_rows(4096, args.digits, seed=args.seed)  # {"prompt": "471=", "answer": "471"}
    config = GRPOConfig(**{**DEMO_DEFAULTS, "max_new_tokens": args.digits + 1, "max_steps": args.max_steps,
                           "seed": args.seed, "output_dir": args.output_dir,
                           "overwrite_output_dir": args.overwrite_output_dir})
    dataset = GRPODataset(rows, tokenizer, num_samples=config.num_generations, use_chat_template=False)
    trainer = GRPOTrainer(model, dataset, config, reward_funcs=[digit_copy_reward], tokenizer=tokenizer)
    trainer.train()
    s = trainer.summary()
    print(f"reward {s['reward_first10']:.3f} (first 10 steps) -> {s['reward_last10']:.3f} (last 10 steps) "
          f"in {s['elapsed_s']:.1f} s; plot: {s['plot']}")

    # look at what the trained policy writes now
    prompts = ["123=", "907=", "555="] if args.digits == 3 else [r["prompt"] for r in rows[:3]]
    responses, _ = trainer.generate_responses([tokenizer(p)["input_ids"] for p in prompts], num_samples=1)
    for p, r in zip(prompts, responses):
        print(f"  {p}{r}")


if __name__ == "__main__":
    main()
