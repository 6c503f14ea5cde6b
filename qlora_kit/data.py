"""Files to token batches: read, tokenize with loss masks, pack or pad, split, and order by a seed.

Records come from `.txt` (the whole file is one text) or `.jsonl`, one JSON object a line with
`text`, or `prompt` + `completion`, or chat `messages` (rendered with the tokenizer's chat template).
Loss falls only on completion / assistant tokens where there is a prompt; label -100 marks the rest.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .loss import IGNORE_INDEX


@dataclass
class Sequences:
    """Fixed-length training rows: (N, T) input_ids, labels and attention_mask."""

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: Tensor | slice) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index],
                "attention_mask": self.attention_mask[index]}

    def rows(self, index: slice) -> Sequences:
        return Sequences(**self.select(index))


def read_records(path: str | os.PathLike) -> list[dict]:
    """Read a .txt or .jsonl file into records.

    Raises:
        FileNotFoundError, ValueError: missing file, unknown extension, bad JSON or fields (with the line number).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise ValueError(f"{path}: the file is empty")
        return [{"text": text}]
    if path.suffix != ".jsonl":
        raise ValueError(f"{path}: unsupported data file type {path.suffix!r}; use .txt or .jsonl")
    records = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            records.append(_check_record(rec, f"{path}:{lineno}"))
    if not records:
        raise ValueError(f"{path}: no records (the file has no non-empty lines)")
    return records


def _check_record(rec: object, where: str) -> dict:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if isinstance(rec.get("text"), str):
        return {"text": rec["text"]}
    if isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
        return {"prompt": rec["prompt"], "completion": rec["completion"]}
    msgs = rec.get("messages")
    if isinstance(msgs, list) and msgs:
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"{where}: messages[{i}] needs string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{where}: messages has no assistant turn to train on")
        return {"messages": msgs}
    raise ValueError(f"{where}: a record needs 'text', or 'prompt' and 'completion', or a non-empty 'messages' list")


def tokenize(record: dict, tokenizer, where: str = "") -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one record; labels are IGNORE_INDEX on prompt / non-assistant tokens."""
    if "text" in record:
        ids = _encode_long(tokenizer, record["text"])
        return ids, list(ids)
    if "prompt" in record:
        p = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + _eos(tokenizer)
        return p + c, [IGNORE_INDEX] * len(p) + c
    return _tokenize_chat(record["messages"], tokenizer, where)


def _encode_long(tokenizer, text: str) -> list[int]:
    # Encode a long text a paragraph group at a time: same tokens except possibly at the seams,
    # and no "sequence longer than the model's maximum" warnings.
    pieces, cur, size = [], [], 0
    for para in text.split("\n\n"):
        cur.append(para)
        size += len(para)
        if size > 4000:
            pieces.append("\n\n".join(cur) + "\n\n")
            cur, size = [], 0
    if cur:
        pieces.append("\n\n".join(cur))
    out: list[int] = []
    for ids in tokenizer(pieces, add_special_tokens=False)["input_ids"]:
        out += ids
    return out


def pad_id(tokenizer) -> int:
    """The padding token: the tokenizer's own, else its end-of-sequence token, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _tokenize_chat(messages: list[dict], tokenizer, where: str) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: chat 'messages' need a tokenizer with a chat template, and this one has none")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    # Each assistant turn's characters: from the end of the prompt that precedes it (with the
    # generation prompt) to the end of the conversation rendered up to and including it.
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not upto.startswith(prefix) or not full.startswith(upto):
            raise ValueError(f"{where}: the chat template does not render conversations incrementally; "
                             "cannot find the assistant tokens")
        spans.append((len(prefix), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = enc["input_ids"], []
    for tok, (a, _end) in zip(ids, enc["offset_mapping"], strict=True):
        inside = any(s <= a < e for s, e in spans)  # a token belongs where it starts
        labels.append(tok if inside else IGNORE_INDEX)
    return ids, labels


def build_sequences(examples: list[tuple[list[int], list[int]]], seq_len: int, pack: bool, pad_id: int,
                    eos_id: int | None, source: str = "data") -> Sequences:
    """Pack examples into one stream cut into seq_len rows, or pad/truncate each to seq_len.

    Raises:
        ValueError: when no row with a trained token results.
    """
    if pack:
        ids, labels = [], []
        for i, (x, y) in enumerate(examples):
            ids += x
            labels += y
            if len(examples) > 1 and eos_id is not None and (not x or x[-1] != eos_id) and i < len(examples) - 1:
                ids.append(eos_id)  # keep documents apart in the stream
                labels.append(eos_id if y and y[-1] != IGNORE_INDEX else IGNORE_INDEX)
        n = len(ids) // seq_len
        if n == 0:
            raise ValueError(f"{source}: {len(ids)} tokens, too few for one sequence of {seq_len}; "
                             "use more data or a shorter --seq-len")
        t_ids = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
        t_lab = torch.tensor(labels[: n * seq_len]).view(n, seq_len)
        mask = torch.ones_like(t_ids)
    else:
        rows = [(x[:seq_len], y[:seq_len]) for x, y in examples if x]
        t_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
        t_lab = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
        for r, (x, y) in enumerate(rows):
            t_ids[r, : len(x)] = torch.tensor(x)
            t_lab[r, : len(y)] = torch.tensor(y)
            mask[r, : len(x)] = 1
    keep = (t_lab[:, 1:] != IGNORE_INDEX).any(dim=1)  # position 0 is never predicted
    seqs = Sequences(t_ids[keep], t_lab[keep], mask[keep])
    if len(seqs) == 0:
        raise ValueError(f"{source}: no sequence has a token to train on (are all completions empty or truncated "
                         "away by --seq-len?)")
    return seqs


def load_dataset(path: str | os.PathLike, tokenizer, seq_len: int, pack: bool = True, eval_fraction: float = 0.02,
                 eval_path: str | os.PathLike | None = None, seed: int = 0) -> tuple[Sequences, Sequences | None]:
    """Read, tokenize, split and cut a data file into (train, eval) sequences.

    A .txt file is split on its token stream: the last `eval_fraction` is held out (a fixed slice at
    the end, never shuffled into training). A .jsonl file's records are shuffled with `seed`, and
    the last `eval_fraction` of them are held out. `eval_path` replaces the split with a second file.
    """
    records = read_records(path)
    if len(records) == 1 and "text" in records[0]:
        pack = True  # one long text: padding would keep only its first seq_len tokens
    pad, eos_id = pad_id(tokenizer), tokenizer.eos_token_id
    examples = [tokenize(r, tokenizer, f"{path}:{i + 1}") for i, r in enumerate(records)]
    train_ex, eval_ex = examples, []
    if eval_path is not None:
        eval_ex = [tokenize(r, tokenizer, f"{eval_path}:{i + 1}") for i, r in enumerate(read_records(eval_path))]
    elif eval_fraction > 0 and len(examples) == 1:
        ids, labels = examples[0]
        cut = len(ids) - max(seq_len, int(len(ids) * eval_fraction))
        train_ex, eval_ex = [(ids[:cut], labels[:cut])], [(ids[cut:], labels[cut:])]
    elif eval_fraction > 0:
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(len(examples) * eval_fraction))
        if n_eval >= len(examples):
            raise ValueError(f"{path}: {len(examples)} records are too few to hold out {n_eval} for evaluation")
        train_ex = [examples[i] for i in order[:-n_eval]]
        eval_ex = [examples[i] for i in order[-n_eval:]]
    train = build_sequences(train_ex, seq_len, pack, pad, eos_id, str(path))
    held = build_sequences(eval_ex, seq_len, pack, pad, eos_id, f"{eval_path or path} (held out)") if eval_ex else None
    return train, held


def micro_batch(train: Sequences, index: int, batch_size: int, seed: int) -> dict[str, Tensor]:
    """The index-th micro-batch of the whole run: epochs follow each other, each in its own seeded order.

    Being a pure function of (index, seed), the data position of a resumed run is just its step count.
    """
    per_epoch = len(train) // batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(train)} training sequences are fewer than one batch of {batch_size}")
    epoch, pos = divmod(index, per_epoch)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return train.select(order[pos * batch_size:(pos + 1) * batch_size])
