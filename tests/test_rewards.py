"""Reward registry, rule rewards, the demo's digit_copy reward, a local reward model and weighted combination."""

import re

import pytest
import torch

from grpo_kernels.trainer import rewards as R


def test_registry():
    assert {"exact_answer", "format", "length_penalty", "digit_copy"} <= set(R.available_rewards())
    assert R.get_reward_func("digit_copy") is R.digit_copy_reward
    f = lambda prompts, completions, **_: [0.0] * len(completions)  # noqa: E731
    assert R.get_reward_func(f) is f
    with pytest.raises(ValueError, match="unknown reward function 'nope'"):
        R.get_reward_func("nope")
    with pytest.raises(ValueError, match="already registered"):
        R.register_reward("format")(f)


def test_exact_answer():
    comps = ["the answer is 42", "\\boxed{3.5} then 7", "#### -1,000\nok", "no number", "41.9999999999", "42."]
    got = R.exact_answer_reward([""] * 6, comps, answer=["42", 3.5, "-1000", "0", 42, "42"])
    assert got == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert R.exact_answer_reward(["", ""], ["1", "2"], answer=["2", "x"]) == [0.0, 0.0]
    with pytest.raises(ValueError, match="'answer' column"):
        R.exact_answer_reward([""], ["1"])


def test_format_and_length_penalty():
    fmt = R.get_reward_func("format")
    assert fmt(["", "", ""], ["<think>hm</think> 4", "4", "<think>x</think>"]) == [1.0, 0.0, 0.0]
    digits_only = R.format_reward_func(r"^\d+$")
    assert digits_only(["", ""], ["123", "12a"]) == [1.0, 0.0]
    lp = R.length_penalty_func(4)
    assert lp(["", "", ""], ["abc", "abcd", "abcdef"]) == [0.0, 0.0, -0.5]
    with pytest.raises(ValueError, match="target_chars"):
        R.length_penalty_func(0)


def test_digit_copy_reward_definition():
    a = ["123"] * 7
    comps = ["123", "120", "1234", "12", "", "321", "999999"]
    # hits / max(len(answer), len(completion))
    assert R.digit_copy_reward([""] * 7, comps, answer=a) == [1.0, 2 / 3, 3 / 4, 2 / 3, 0.0, 1 / 3, 0.0]


def test_combined_weights_and_per_function_values():
    c = R.CombinedReward(["digit_copy", R.length_penalty_func(2)], weights=[1.0, 2.0])
    total, per = c(["1="] * 2, ["123", "1"], answer=["1", "1"])
    assert c.names == ["digit_copy", "length_penalty"]
    torch.testing.assert_close(per["digit_copy"], torch.tensor([1 / 3, 1.0]))
    torch.testing.assert_close(per["length_penalty"], torch.tensor([-0.5, 0.0]))
    torch.testing.assert_close(total, torch.tensor([1 / 3 - 1.0, 1.0]))
    none_fn = lambda prompts, completions, **_: [None, 2.0]  # noqa: E731
    total, per = R.CombinedReward([none_fn])(["a", "b"], ["x", "y"])
    assert total.tolist() == [0.0, 2.0]
    with pytest.raises(ValueError, match="2 entries for 1 reward"):
        R.CombinedReward(["format"], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        R.CombinedReward([lambda p, c, **_: [1.0]])(["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="at least one"):
        R.CombinedReward([])


def test_reward_model_from_local_path(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from grpo_kernels.trainer.demo import build_tokenizer

    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    m = LlamaForSequenceClassification(cfg).eval()
    m.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    rm = R.RewardModel(str(tmp_path), batch_size=2)
    prompts, comps = ["1=", "22=", "3="], ["1", "22", "0000"]
    got = rm(prompts, comps)
    # the same model scoring each text alone (no padding) gives the same numbers
    with torch.no_grad():
        want = [m(**tok(p + c, return_tensors="pt")).logits[0, 0].item() for p, c in zip(prompts, comps)]
    assert got == pytest.approx(want, abs=1e-5)
    assert len(set(round(x, 6) for x in got)) == 3  # a real model, not a constant
    total, per = R.CombinedReward([rm, "digit_copy"], weights=[0.5, 1.0])(prompts, comps, answer=["1", "22", "3"])
    torch.testing.assert_close(total, 0.5 * torch.tensor(want) + torch.tensor([1.0, 1.0, 0.0]))
    assert set(per) == {"reward_model", "digit_copy"}
    with pytest.raises(ValueError, match="not a local directory"):
        R.RewardModel(str(tmp_path / "nope"))


def test_bad_return_values_name_the_function_and_what_it_returned():
    import numpy as np

    def of(value):
        def my_reward(prompts, completions, **_):
            return value() if callable(value) else value

        return my_reward

    cases = [(None, "it returned None"), (lambda: (1.0 for _ in range(2)), "it returned a generator"),
             ("1.0", "it returned a str '1.0'"), ([[1.0], [0.0]], "score 0 is a list [1.0]"),
             ({"a": 1.0, "b": 0.0}, "it returned a dict"), ([1.0, "0.5"], "score 1 is a str '0.5'"),
             ([1.0, float("nan")], "score 1 is nan (scores must be finite)"), ([1.0], "it returned 1 scores for 2"),
             (torch.ones(2, 1), "it returned a 2-D Tensor of shape (2, 1)"), (7.0, "it returned a float 7.0")]
    for value, what in cases:
        with pytest.raises(R.RewardFunctionError, match=r"reward function 'my_reward' \(defined at .*test_rewards.py:"
                                                        r"\d+\) must return a list of 2 scores .*; " + re.escape(what)):
            R.CombinedReward([of(value)])(["a", "b"], ["x", "y"])
    assert issubclass(R.RewardFunctionError, TypeError) and issubclass(R.RewardFunctionError, ValueError)
    for ok in ((1.0, 2.0), np.array([1.0, 2.0]), torch.tensor([1.0, 2.0]), [np.float32(1.0), 2],
               [True, torch.tensor(2.0)]):
        total, _ = R.CombinedReward([of(ok)])(["a", "b"], ["x", "y"])
        assert total.tolist() == [1.0, 2.0]
    total, _ = R.CombinedReward([of([None, 2.0])])(["a", "b"], ["x", "y"])
    assert total.tolist() == [0.0, 2.0]
