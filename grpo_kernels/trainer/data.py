"""``GRPODataset``: prompts (and optionally fixed responses and rewards) read from JSONL or a list of dicts.

Row formats (one JSON object per line):

* ``{"prompt": str, "answer": any, ...}`` -- online: responses are generated during training; the extra
  columns (``answer`` and any others) are passed to the reward functions.
* ``{"prompt": str, "responses": [str, ...]}`` -- offline responses, scored by the reward functions.
* ``{"prompt": str, "responses": [str, ...], "rewards": [float, ...]}`` -- fully offline: no generation, no scoring.

``prompt`` may also be a list of chat messages (``[{"role": "user", "content": ...}, ...]``). Offline rows must
carry exactly ``num_samples`` responses (the group size). When the tokenizer has a chat template (and
``use_chat_template`` is on) the prompt is formatted with it and ``add_generation_prompt=True``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Sequence, Union

import torch


class DatasetFormatError(ValueError):
    """A malformed row; the message names the file (or ``<list>``) and the 1-based line/row number."""


class GRPODataset(torch.utils.data.Dataset):
    """Tokenized GRPO rows.

    Args:
        data_path: a ``.jsonl`` path, or a list of dicts (same formats).
        tokenizer: a Hugging Face tokenizer (needs ``eos_token_id``).
        num_samples: G, responses per prompt; offline rows must have exactly this many.
        max_length: prompt + response tokens; longer rows are truncated (prompt from the left down to
            ``max_length // 2`` tokens at most if it alone is too long, then the response from the right).
            ``self.num_truncated`` counts the rows that were cut.
        use_chat_template: format prompts with the tokenizer's chat template when it has one.
        skip_invalid: skip malformed rows instead of raising; ``self.num_skipped`` and ``self.skipped``
            (list of ``(line, reason)``) report them.
        append_eos: end each offline response with ``eos_token_id`` (what a sampled response that stopped has).

    ``ds[i]`` is a dict with ``prompt`` (formatted text), ``prompt_ids`` (list of int), and, when present,
    ``responses`` (list of str), ``response_ids`` (list of G lists of int), ``rewards`` (list of G floats), plus
    every other column of the row (``answer`` ...) unchanged.
    """

    def __init__(self, data_path: Union[str, os.PathLike, Sequence[Dict[str, Any]]], tokenizer, num_samples: int = 4,
                 max_length: int = 2048, *, use_chat_template: bool = True, skip_invalid: bool = False,
                 append_eos: bool = True):
        if tokenizer is None:
            raise ValueError("tokenizer is required")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        self.tokenizer = tokenizer
        self.num_samples = num_samples
        self.max_length = max_length
        self.use_chat_template = bool(use_chat_template and getattr(tokenizer, "chat_template", None))
        self.append_eos = append_eos
        self.skipped: List[tuple] = []
        self.num_truncated = 0
        self.source = "<list>"
        if isinstance(data_path, (str, os.PathLike)):
            self.source = os.fspath(data_path)
            raw = list(self._read_jsonl(self.source, skip_invalid))
        elif isinstance(data_path, Sequence):
            raw = [(i + 1, r) for i, r in enumerate(data_path)]
        else:
            raise TypeError(f"data_path must be a path or a list of dicts, got {type(data_path).__name__}")
        self.rows: List[Dict[str, Any]] = []
        for line, row in raw:
            try:
                self.rows.append(self._encode(row))
            except DatasetFormatError as e:
                msg = f"{self.source}: line {line}: {e}"
                if not skip_invalid:
                    raise DatasetFormatError(msg) from None
                self.skipped.append((line, str(e)))
        if not self.rows:
            raise DatasetFormatError(f"{self.source}: no usable rows" + (f" ({self.num_skipped} skipped)" if self.skipped else ""))
        kinds = {self._kind(r) for r in self.rows}
        if len(kinds) > 1:
            raise DatasetFormatError(f"{self.source}: rows mix formats {sorted(kinds)}; use one format per dataset")
        self.kind = kinds.pop()

    # ------------------------------------------------------------------ reading
    def _read_jsonl(self, path: str, skip_invalid: bool):
        if os.path.isdir(path):
            raise DatasetFormatError(f"dataset {path!r} is a directory, not a JSONL file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"dataset file {path!r} does not exist")
        with open(path, "rb") as f:
            for i, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    msg = f"{path}: line {i}: not UTF-8 text ({e.reason} at byte {e.start} of the line)"
                    if not skip_invalid:
                        raise DatasetFormatError(msg) from None
                    self.skipped.append((i, "not UTF-8 text"))
                    continue
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    msg = f"{path}: line {i}: invalid JSON ({e.msg} at column {e.colno})"
                    if not skip_invalid:
                        raise DatasetFormatError(msg) from None
                    self.skipped.append((i, f"invalid JSON ({e.msg})"))
                    continue
                yield i, row

    @staticmethod
    def _kind(row) -> str:
        if "rewards" in row:
            return "offline_rewards"
        if "responses" in row:
            return "offline"
        return "online"

    def format_prompt(self, prompt) -> str:
        if isinstance(prompt, list):
            if not self.use_chat_template:
                raise DatasetFormatError("'prompt' is a list of messages but the tokenizer has no chat template "
                                         "(or use_chat_template is off)")
            return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        return prompt

    def _encode(self, row) -> Dict[str, Any]:
        if not isinstance(row, dict):
            raise DatasetFormatError(f"expected a JSON object, got {type(row).__name__}")
        if "prompt" not in row:
            raise DatasetFormatError(f"missing 'prompt' (keys: {sorted(row)})")
        prompt = row["prompt"]
        if isinstance(prompt, list):
            if not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
                raise DatasetFormatError("'prompt' as a list must hold {'role', 'content'} messages")
        elif not isinstance(prompt, str) or not prompt:
            raise DatasetFormatError(f"'prompt' must be a non-empty string or a list of messages, got {prompt!r:.60}")
        if "rewards" in row and "responses" not in row:
            raise DatasetFormatError("'rewards' given without 'responses'")
        text = self.format_prompt(prompt)
        # a chat template already wrote any special tokens it wants
        ids = self.tokenizer(text, add_special_tokens=not self.use_chat_template)["input_ids"]
        out = {k: v for k, v in row.items() if k not in ("prompt", "responses", "rewards")}
        out["prompt"] = text
        budget = self.max_length
        truncated = False
        if "responses" in row:
            resp = row["responses"]
            if not isinstance(resp, list) or not all(isinstance(r, str) for r in resp):
                raise DatasetFormatError("'responses' must be a list of strings")
            if len(resp) != self.num_samples:
                raise DatasetFormatError(f"'responses' has {len(resp)} entries, expected num_samples={self.num_samples}")
            if len(ids) > budget // 2:  # keep room for the responses
                ids, truncated = ids[-(budget // 2):], True
            rids = []
            for r in resp:
                t = self.tokenizer(r, add_special_tokens=False)["input_ids"]
                if self.append_eos:
                    t = t + [self.tokenizer.eos_token_id]
                if len(ids) + len(t) > budget:
                    t, truncated = t[:budget - len(ids)], True
                rids.append(t)
            out["responses"] = list(resp)
            out["response_ids"] = rids
            if "rewards" in row:
                rw = row["rewards"]
                if (not isinstance(rw, list) or len(rw) != self.num_samples
                        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in rw)):
                    raise DatasetFormatError(f"'rewards' must be a list of {self.num_samples} finite numbers, got {rw!r:.80}")
                out["rewards"] = [float(x) for x in rw]
        elif len(ids) > budget - 1:
            ids, truncated = ids[-(budget - 1):], True
        out["prompt_ids"] = list(ids)
        self.num_truncated += truncated
        return out

    def encode_row(self, row: Dict[str, Any]) -> Dict[str, Any]:
        """Tokenize one raw row dict with this dataset's settings (errors raise :class:`DatasetFormatError`)."""
        return self._encode(row)

    # ------------------------------------------------------------------ dataset protocol
    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def offline(self) -> bool:
        return self.kind != "online"

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i) -> Dict[str, Any]:
        return self.rows[i]

    def __repr__(self) -> str:
        return (f"GRPODataset({self.source!r}, rows={len(self)}, kind={self.kind}, num_samples={self.num_samples}, "
                f"skipped={self.num_skipped}, truncated={self.num_truncated})")


def collate(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The trainer works on lists of row dicts; this is the identity collate for a DataLoader."""
    return list(rows)
