"""The built-in demo: a tiny random-init Llama learns, by GRPO alone, to copy a digit string -- on a CPU.

Everything is built in code, nothing is downloaded:

* :func:`build_tokenizer` -- a character-level ``PreTrainedTokenizerFast`` (``<pad> <bos> <eos> <unk>``, the ten
  digits and ``= + - space``), made with the ``tokenizers`` library; ``save_pretrained`` works.
* :func:`build_model` -- a ``LlamaForCausalLM`` from a ``LlamaConfig`` (2 layers, hidden 64), random init from a seed.
* :func:`make_copy_rows` -- the task: prompt ``"<bos>4 7 1="``-style rows ``{"prompt": "471=", "answer": "471"}``.
  The answer must be produced after ``=``, followed by ``<eos>``.
* The reward is :func:`grpo_kernels.trainer.rewards.digit_copy_reward`:
  ``#{i < n : completion[i] == answer[i]} / max(n, len(completion))`` -- per-position credit, 1.0 only for the
  exact copy followed by ``<eos>``. A uniformly random policy over the 18 tokens scores about 0.05.

There is no supervised warm start: the model starts from random weights and only ever sees its own samples
and their rewards.
"""

from __future__ import annotations

import random
from typing import Dict, List

DEMO_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
DEMO_CHARS = list("0123456789=+- ")

# Tuned on a 2-core CPU (random init, seeds 0-2 reach a 10-step mean reward of 0.9 in 85-120 steps).
DEMO_DEFAULTS = dict(
    output_dir="grpo_demo_output",
    max_steps=200,
    per_device_batch_size=32,  # prompts per step
    num_generations=8,  # G: 256 sampled responses per step
    num_iterations=2,  # two clipped updates per batch of samples
    max_new_tokens=4,  # 3 digits + <eos>
    temperature=1.0,
    learning_rate=1e-3,
    warmup_steps=5,
    lr_scheduler="cosine",
    min_lr_ratio=0.1,
    max_grad_norm=1.0,
    loss_type="grpo",
    scale_rewards="group",
    reward_funcs=["digit_copy"],
    use_chat_template=False,
    save_steps=0,
    target_reward=0.9,
    device="cpu",
)
DEMO_MODEL = dict(hidden_size=64, num_layers=2, num_heads=4)
DEMO_NUM_DIGITS = 3
DEMO_NUM_PROMPTS = 4096


def build_tokenizer(chars: List[str] = None, chat_template: bool = False):
    """Character-level fast tokenizer; prompts get a leading ``<bos>``; decoding joins characters.

    With ``chat_template=True`` it also carries a minimal template (``<bos>user: …\\nassistant: ``, it writes the ``<bos>``), which needs
    letters, so the vocabulary then includes ``a-z``, ``:`` and newline.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list(DEMO_CHARS if chars is None else chars)
    if chat_template:
        chars += [c for c in "abcdefghijklmnopqrstuvwxyz:\n" if c not in chars]
    vocab = {t: i for i, t in enumerate(DEMO_SPECIALS + chars)}
    if len(vocab) != len(DEMO_SPECIALS) + len(chars):
        raise ValueError("chars must be distinct single characters")
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                      special_tokens=[("<bos>", vocab["<bos>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>", padding_side="left")
    if chat_template:
        tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                             "{% if add_generation_prompt %}assistant: {% endif %}")
    return tok


def build_model(tokenizer, seed: int = 0, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                max_positions: int = 64):
    """A random-init ``LlamaForCausalLM`` sized for the tokenizer (``hidden_size`` wide, ``num_layers`` deep)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                      max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      tie_word_embeddings=False)
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def make_copy_rows(n: int, num_digits: int = DEMO_NUM_DIGITS, seed: int = 0) -> List[Dict[str, str]]:
    """``n`` rows ``{"prompt": "471=", "answer": "471"}`` with uniformly random digit strings."""
    if n < 1 or num_digits < 1:
        raise ValueError(f"n and num_digits must be >= 1, got {n}, {num_digits}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        s = "".join(rng.choice("0123456789") for _ in range(num_digits))
        rows.append({"prompt": s + "=", "answer": s})
    return rows
