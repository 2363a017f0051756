"""``grpo_loss`` dropped into a hand-written loop -- no trainer, every step visible.

Per step: sample G completions per prompt with ``model.generate``, score them, shift the logits so that
``logits[:, t]`` predicts completion token ``t``, mask everything after ``<eos>``, and call
``grpo_kernels.grpo_loss`` (fused kernel for the logits' device, torch reference otherwise). Uses the demo's
tiny random-init model and digit-copy task so it runs anywhere:

    python python/hand_written_loop.py            # CPU, ~30-60 s; reward ~0.07 -> ~0.9
    python python/hand_written_loop.py --device cuda

To use your own model, replace ``build_model``/``build_tokenizer`` with ``AutoModelForCausalLM``/``AutoTokenizer``
on a local path and ``reward`` with your scorer.
"""

import argparse
import random

import torch

from grpo_kernels import grpo_loss
from grpo_kernels.trainer.demo import build_model, build_tokenizer
from grpo_kernels.trainer.rewards import digit_copy_reward


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    dev = torch.device(args.device)

    tok = build_tokenizer()
    model = build_model(tok, seed=args.seed).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    B, G, N = 32, 8, 3  # prompts per step, samples per prompt, digits
    eos, pad = tok.eos_token_id, tok.pad_token_id

    for step in range(1, args.steps + 1):
        answers = ["".join(rng.choice("0123456789") for _ in range(N)) for _ in range(B)]
        prompt = tok([a + "=" for a in answers], return_tensors="pt")["input_ids"].to(dev)  # same length: no padding
        prompt = prompt.repeat_interleave(G, 0)  # rows g*G ... g*G+G-1 answer prompt g
        P = prompt.shape[1]

        # 1. sample
        model.eval()
        with torch.no_grad():
            seq = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                 temperature=1.0, top_k=None, max_new_tokens=N + 1, pad_token_id=pad, eos_token_id=eos)
        comp = seq[:, P:]
        is_eos = comp == eos
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(comp[:, 0], comp.shape[1]))
        mask = torch.arange(comp.shape[1], device=dev)[None] <= first[:, None]  # up to and including <eos>

        # 2. score
        texts = [tok.decode(c[:int(m.sum())], skip_special_tokens=True) for c, m in zip(comp, mask)]
        rewards = torch.tensor(digit_copy_reward(None, texts, answer=[a for a in answers for _ in range(G)]), device=dev)

        # 3. loss: logits at position P-1+t predict completion token t
        model.train()
        logits = model(input_ids=seq, attention_mask=torch.cat([torch.ones_like(prompt), mask.long()], 1)).logits
        logits = logits[:, P - 1:-1]
        tokens = comp.masked_fill(~mask, -100)
        loss = grpo_loss(logits, tokens, rewards, mask, group_size=G, loss_type="grpo")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0:
            print(f"step {step:4d}  reward {rewards.mean().item():.3f}  mean length {mask.sum(1).float().mean().item():.2f}")


if __name__ == "__main__":
    main()
