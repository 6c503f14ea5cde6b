"""Many adapters on one base: mixed batches against each adapter alone and PEFT, generation against transformers'
generate, continuous batching, adapters loaded and unloaded mid-generation, and the HTTP server through the real
openai client on 127.0.0.1."""

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import peft
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    MistralConfig,
    Qwen3Config,
)

import qlora_kit as qk
from qlora_kit.engine import Engine, SamplingParams, UnknownAdapter
from qlora_kit.loading import load_tokenizer
from qlora_kit.multi_lora import AdapterBank

from .conftest import make_model, randomize_b, rel_err, token_batch
from .test_adapters import peft_on

# (rank, alpha, targets, extra LoRA options): ranks, scales and target sets differ between adapters
SPECS = [(4, 8, "all-linear", {}),
         (8, 5, ["q_proj", "v_proj", "c_attn"], {"rslora": True}),
         (2, 16, "all-linear", {"rank_pattern": {"down_proj": 6, "mlp.c_proj": 6}, "alpha_pattern": {"o_proj": 3}})]


def make_adapters(folder, out, quant, specs=SPECS, std=0.2):
    paths = []
    for i, (r, alpha, targets, extra) in enumerate(specs):
        model = qk.load_quantized(folder, quant=quant, compute_dtype=torch.float32)
        if isinstance(targets, list):
            targets = [t for t in targets if any(n.endswith(t) for n, _ in model.named_modules())]
        qk.add_lora(model, r=r, alpha=alpha, dropout=0.0, targets=targets, **extra)
        randomize_b(model, seed=i, std=std)
        paths.append(qk.save_adapter(model, out / f"ad{i}"))
    return paths


def alone(folder, quant, adapter):
    model = qk.load_quantized(folder, quant=quant, compute_dtype=torch.float32)
    if adapter is not None:
        qk.load_adapter(model, adapter)
    return model.eval()


@pytest.mark.parametrize("arch,quant", [("llama", "nf4"), ("qwen2", "none"), ("gpt2", "nf4")])
def test_every_row_of_a_mixed_batch_is_its_adapter_alone_and_peft(model_dirs, tmp_path, arch, quant):
    folder = model_dirs[arch]
    paths = make_adapters(folder, tmp_path, quant)
    base = qk.load_quantized(folder, quant=quant, compute_dtype=torch.float32)
    bank = AdapterBank(base)
    for i, p in enumerate(paths):
        bank.load(f"ad{i}", p)
    rows = ["ad1", "ad1", None, "ad0", "ad2", "ad1"]  # runs of one adapter, and an adapter in two runs
    ids = token_batch(len(rows), 10)
    with torch.no_grad(), bank.rows(rows):
        mixed = base(ids).logits  # runs of rows (the CPU's way)
        bank.gathered = True
        gathered = base(ids).logits  # each row's factors stacked (a GPU's way)
        bank.gathered = False
    assert rel_err(gathered, mixed) < 1e-6
    step = token_batch(len(rows), 1, seed=5)  # one token a row: the whole storage in two matmuls, rows masked
    with torch.no_grad():
        with bank.rows(rows):
            together = base(step).logits
        for b, name in enumerate(rows):
            with bank.rows([name]):
                assert rel_err(together[b:b + 1], base(step[b:b + 1]).logits) < 1e-5
    for b, name in enumerate(rows):
        path = None if name is None else paths[int(name[2])]
        with torch.no_grad():
            own = alone(folder, quant, path)(ids[b:b + 1]).logits
        assert rel_err(mixed[b:b + 1], own) < 1e-5, (name, rel_err(mixed[b:b + 1], own))
        if path is not None:
            pm = peft_on(folder, path, quant=None if quant == "none" else quant)
            with torch.no_grad():
                theirs = pm(ids[b:b + 1]).logits
                with pm.disable_adapter():
                    plain = pm(ids[b:b + 1]).logits
            assert rel_err(theirs, plain) > 1e-3  # the adapter matters...
            # ...and the row is PEFT's: exactly on the dense base, to bitsandbytes' own dequantization on nf4
            assert rel_err(mixed[b:b + 1], theirs) < (1e-5 if quant == "none" else 1e-4)


def test_mixed_batch_on_the_triton_kernels(model_dirs, tmp_path, monkeypatch):
    """On a GPU the base goes through the fused Triton dequant-matmul and the gathered LoRA adds on top; here the
    same path runs in Triton's CPU interpreter, against the reference path."""
    from qlora_kit import kernels

    folder = model_dirs["llama"]
    paths = make_adapters(folder, tmp_path, "nf4", specs=SPECS[:2])
    base = qk.load_quantized(folder, quant="nf4", compute_dtype=torch.float32)
    bank = AdapterBank(base)
    for i, p in enumerate(paths):
        bank.load(f"ad{i}", p)
    ids = token_batch(3, 5)
    calls = []
    fused_linear = kernels.quant_lora_linear
    monkeypatch.setattr(kernels, "quant_lora_linear", lambda *a, **k: calls.append(1) or fused_linear(*a, **k))
    with torch.no_grad(), bank.rows(["ad1", None, "ad0"]):
        with kernels.kernel_mode("triton"):
            fused = base(ids).logits
        assert len(calls) == len(bank.layers)  # every layer's base went through the kernel
        with kernels.kernel_mode("off"):
            plain = base(ids).logits
    assert rel_err(fused, plain) < 1e-5


def test_adding_an_adapter_costs_its_own_bytes(model_dirs, tmp_path):
    folder = model_dirs["llama"]
    paths = make_adapters(folder, tmp_path, "nf4")
    base = qk.load_quantized(folder, quant="nf4", compute_dtype=torch.float32)
    before = {n: t.data_ptr() for n, t in base.state_dict().items()}
    bank = AdapterBank(base)
    sizes = []

    def held():  # what the layers hold, counted tensor by tensor
        return sum(t.numel() * t.element_size() for layer in bank.layers.values() for ab in layer.factors.values()
                   for t in ab)

    for i, p in enumerate(paths):
        was = held()
        info = bank.load(f"ad{i}", p)
        factors = sum(t.numel() * 4 for ab in qk.adapters.read_adapter(p)[1].values() for t in ab)
        assert info.nbytes == factors
        sizes.append(held() - was)
    assert sizes == [a.nbytes for a in bank.adapters.values()]  # each adds its own factors, nothing more
    assert bank.nbytes() == held()
    after = {n.replace(".base.", "."): t.data_ptr() for n, t in base.state_dict().items()}
    assert after == before  # the base's tensors are the same storage: never copied
    bank.unload("ad0")
    assert held() == bank.nbytes() == sum(sizes) - sizes[0] and "ad0" not in bank


def test_refusals_name_the_adapter_and_change_nothing(model_dirs, tmp_path):
    base = qk.load_quantized(model_dirs["llama"], quant="nf4", compute_dtype=torch.float32)
    bank = AdapterBank(base)
    other = make_adapters(model_dirs["qwen2"], tmp_path / "q", "nf4", specs=SPECS[:1])[0]
    with pytest.raises(ValueError, match="trained on a different base"):
        bank.load("x", other)
    wide = make_model("llama", hidden_size=32, intermediate_size=64)
    wide.save_pretrained(tmp_path / "wide")
    pm = peft.get_peft_model(wide, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "wide_ad")  # PEFT's own file: no fingerprint, so the shapes tell
    with pytest.raises(ValueError, match=r"q_proj.*but the base's layer is 64 -> 64") as e:
        bank.load("x", tmp_path / "wide_ad")
    assert "\n" not in str(e.value)
    good = make_adapters(model_dirs["llama"], tmp_path / "l", "nf4", specs=SPECS[:1])[0]
    bank.load("a", good)
    with pytest.raises(ValueError, match="already loaded"):
        bank.load("a", good)
    assert list(bank.adapters) == ["a"] and bank.nbytes() > 0
    with pytest.raises(KeyError):
        bank.id_of("b")


@pytest.fixture(scope="module")
def chat_model(run_model, tmp_path_factory):
    """The tiny random Llama with a real tokenizer and chat template (conftest's run_model), and three adapters
    for it; the adapters' folder has room for more."""
    tok = load_tokenizer(run_model)
    paths = make_adapters(run_model, tmp_path_factory.mktemp("serve_adapters"), "nf4", std=0.5)
    return run_model, tok, paths


def engine_for(chat_model, **kw):
    folder, tok, paths = chat_model
    eng = Engine(qk.load_quantized(folder, quant="nf4", compute_dtype=torch.float32), tok, **kw)
    for i, p in enumerate(paths):
        eng.load_adapter(f"ad{i}", p)
    return eng


PROMPTS = ["ROMEO:\nJuliet loves", "NURSE", "TYBALT:\nRomeo fears the moon.\nJULIET:\n", "ROMEO", "JULIET:\nThe"]
ROWS = ["ad0", None, "ad2", "ad1", "ad0"]


def hf_greedy(chat_model, prompt, adapter, n):
    """transformers' own generate on the PEFT model of that adapter (bitsandbytes nf4 base): the reference."""
    folder, tok, paths = chat_model
    model = alone(folder, "nf4", None if adapter is None else paths[int(adapter[2])])
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_batched_greedy_generation_is_each_prompt_alone(chat_model):
    eng = engine_for(chat_model)
    outs = eng.generate(PROMPTS, ROWS, SamplingParams(max_tokens=16, ignore_eos=True))
    for p, a, o in zip(PROMPTS, ROWS, outs, strict=True):
        assert o.token_ids == hf_greedy(chat_model, p, a, 16), (p, a)
        assert o.finish_reason == "length" and o.completion_tokens == 16
    # continuous batching: requests that join a running batch, and rows that leave it, change no row's tokens
    reqs = []
    for i, (p, a) in enumerate(zip(PROMPTS, ROWS, strict=True)):
        reqs.append(eng.submit(p, a, SamplingParams(max_tokens=4 + 3 * i, ignore_eos=True)))
        eng.step()
        eng.step()
    while eng.step():
        pass
    for r, o in zip(reqs, outs, strict=True):
        assert r.out_ids == o.token_ids[:len(r.out_ids)] and len(r.out_ids) == r.params.max_tokens
    assert eng._cache is None and not eng.running  # everything left; nothing held


FAMILY_CONFIGS = {  # sliding windows shorter than prompt + generation; GPT-2's learned absolute positions
    "mistral": lambda c: MistralConfig(**c, sliding_window=8),
    "gemma2": lambda c: Gemma2Config(**c, head_dim=16, sliding_window=8),
    "qwen3": lambda c: Qwen3Config(**c, head_dim=16),
    "gpt2": lambda c: GPT2Config(vocab_size=c["vocab_size"], n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                 eos_token_id=c["eos_token_id"], bos_token_id=c["eos_token_id"]),
}


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_generation_in_other_families_is_each_prompt_alone(chat_model, tmp_path, family):
    _, tok, _ = chat_model
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(FAMILY_CONFIGS[family](common)).save_pretrained(tmp_path / "m")
    paths = make_adapters(tmp_path / "m", tmp_path, "nf4", specs=SPECS[:2], std=0.3)
    eng = Engine(qk.load_quantized(tmp_path / "m", quant="nf4", compute_dtype=torch.float32), tok, max_batch=3)
    for i, p in enumerate(paths):
        eng.load_adapter(f"ad{i}", p)
    rows = ["ad1", None, "ad0", "ad1"]  # four requests, three rows: the last joins when the first leaves
    outs = eng.generate(PROMPTS[:4], rows, [SamplingParams(max_tokens=n, ignore_eos=True) for n in (5, 12, 12, 12)])
    for p, a, o in zip(PROMPTS[:4], rows, outs, strict=True):
        model = alone(tmp_path / "m", "nf4", None if a is None else paths[int(a[2])])
        ids = tok(p, return_tensors="pt").input_ids
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(o.token_ids),
                              do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
        assert o.token_ids == want[0, ids.shape[1]:].tolist(), (family, p, a)


def test_sampling_is_seeded_per_request_and_top_p_narrows_it(chat_model):
    eng = engine_for(chat_model)
    hot = SamplingParams(max_tokens=12, temperature=1.5, seed=7, ignore_eos=True)
    alone_ = eng.generate(["ROMEO"], ["ad1"], hot)[0].token_ids
    crowd = eng.generate(["ROMEO", "NURSE", "ROMEO"], ["ad1", "ad0", "ad1"],
                         [hot, SamplingParams(max_tokens=5, temperature=1.0, seed=1), hot])
    assert crowd[0].token_ids == alone_ and crowd[2].token_ids == alone_  # same seed, same sample, any batch
    other = eng.generate(["ROMEO"], ["ad1"], SamplingParams(max_tokens=12, temperature=1.5, seed=8,
                                                           ignore_eos=True))[0].token_ids
    assert other != alone_
    greedy = eng.generate(["ROMEO"], ["ad1"], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    nucleus = SamplingParams(max_tokens=12, temperature=1.5, top_p=1e-6, seed=3, ignore_eos=True)
    assert eng.generate(["ROMEO"], ["ad1"], nucleus)[0].token_ids == greedy  # the nucleus is the top token
    for narrow in (dict(top_k=1), dict(min_p=1.0)):  # only the most likely token is left to draw
        params = SamplingParams(max_tokens=12, temperature=1.5, seed=3, ignore_eos=True, **narrow)
        assert eng.generate(["ROMEO"], ["ad1"], params)[0].token_ids == greedy
    tiny = SamplingParams(max_tokens=12, temperature=1e-9, seed=3, ignore_eos=True)  # greedy, not a NaN
    assert eng.generate(["ROMEO"], ["ad1"], tiny)[0].token_ids == greedy
    ended = eng.generate(["ROMEO"], ["ad1"], SamplingParams(max_tokens=12, stop_token_ids=[greedy[3]]))[0]
    assert ended.token_ids == greedy[:greedy.index(greedy[3]) + 1] and ended.finish_reason == "stop"
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_stop_strings_streaming_and_limits(chat_model):
    eng = engine_for(chat_model)
    full = eng.generate(["ROMEO:\n"], ["ad0"], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    stop = full.text[5:8]
    assert stop and full.text.find(stop) >= 3
    cut = eng.generate(["ROMEO:\n"], ["ad0"], SamplingParams(max_tokens=16, stop=[stop, "never"],
                                                            ignore_eos=True))[0]
    assert cut.text == full.text[:full.text.find(stop)] and cut.finish_reason == "stop"
    pieces = list(eng.stream("ROMEO:\n", "ad0", SamplingParams(max_tokens=16, ignore_eos=True)))
    assert len(pieces) > 3 and "".join(pieces) == full.text
    assert "".join(eng.stream("ROMEO:\n", "ad0", SamplingParams(max_tokens=16, stop=stop,
                                                                ignore_eos=True))) == cut.text
    with pytest.raises(ValueError, match="context of 256"):
        eng.submit("ROMEO", None, SamplingParams(max_tokens=300))
    with pytest.raises(UnknownAdapter):
        eng.submit("ROMEO", "nope")
    with pytest.raises(ValueError, match="empty"):
        eng.submit([], None)


def test_a_failed_step_ends_its_requests_with_the_error(chat_model, monkeypatch):
    eng = engine_for(chat_model)
    running = eng.submit("ROMEO", "ad0", SamplingParams(max_tokens=8))
    eng.step()
    admitted = eng.submit("NURSE", None, SamplingParams(max_tokens=8))

    def boom(*args):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(eng, "_forward", boom)
    with pytest.raises(RuntimeError):
        eng.step()
    for req in (running, admitted):  # both end: neither waits forever
        assert req.done.is_set() and req.finish_reason == "error: out of memory, say"
    assert not eng.running and not eng.waiting and eng._cache is None
    monkeypatch.undo()
    assert eng.generate(["ROMEO"], ["ad0"], SamplingParams(max_tokens=3))[0].finish_reason == "length"


def test_a_model_without_an_attention_cache_is_refused(chat_model, tmp_path):
    from transformers import MambaConfig

    _, tok, _ = chat_model
    cfg = MambaConfig(vocab_size=len(tok), hidden_size=64, state_size=8, num_hidden_layers=2,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "mamba")
    with pytest.raises(ValueError, match="MambaForCausalLM keeps a generation state other than an attention"):
        Engine(qk.load_quantized(tmp_path / "mamba", quant="nf4", compute_dtype=torch.float32), tok)


def test_chat_template_prompt(chat_model):
    eng = engine_for(chat_model)
    _, tok, _ = chat_model
    ids = eng.chat_prompt([{"role": "user", "content": "Who loves the moon?"}])
    assert tok.decode(ids) == "<|im_start|>user\nWho loves the moon?<|im_end|>\n<|im_start|>assistant\n"


def test_loading_and_unloading_during_generation_leave_running_requests_correct(chat_model):
    eng = engine_for(chat_model)
    want = eng.generate(PROMPTS[:3], ["ad0", "ad1", "ad0"], SamplingParams(max_tokens=24, ignore_eos=True))
    eng.start()
    try:
        reqs = [eng.submit(p, a, SamplingParams(max_tokens=24, ignore_eos=True))
                for p, a in zip(PROMPTS[:3], ["ad0", "ad1", "ad0"], strict=True)]
        while not any(r.out_ids for r in reqs):
            time.sleep(0.005)
        eng.unload_adapter("ad0")  # rows still use it: its factors stay until they finish
        with pytest.raises(UnknownAdapter):
            eng.submit("ROMEO", "ad0")
        eng.load_adapter("late", chat_model[2][2])
        late = eng.submit(PROMPTS[2], "late", SamplingParams(max_tokens=6, ignore_eos=True))
        for r in [*reqs, late]:
            assert r.done.wait(60)
        assert [r.out_ids for r in reqs] == [w.token_ids for w in want]
        assert late.out_ids == hf_greedy(chat_model, PROMPTS[2], "ad2", 6)
        deadline = time.time() + 10
        while eng._retired and time.time() < deadline:  # freed at the step after its last row left
            eng.submit("ROMEO", None, SamplingParams(max_tokens=1)).done.wait(10)
        assert not eng._retired and not any(1 in layer.factors for layer in eng.bank.layers.values())
    finally:
        eng.stop()


# ---- the HTTP server ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(chat_model):
    """A live server on 127.0.0.1 (uvicorn in a thread), the base named 'base'."""
    import uvicorn

    from qlora_kit.server import create_app

    eng = engine_for(chat_model, max_batch=4)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(eng, "base"), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", eng
    srv.should_exit = True
    thread.join(30)


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_server_answers_as_python_does(server, chat_model):
    url, _ = server
    c = client(url)
    assert [m.id for m in c.models.list().data][:4] == ["base", "ad0", "ad1", "ad2"]
    py = engine_for(chat_model)  # a separate engine on a separately loaded base
    for adapter in ["ad1", None]:
        got = c.completions.create(model=adapter or "base", prompt="ROMEO:\n", max_tokens=12, temperature=0,
                                   extra_body={"ignore_eos": True})
        want = py.generate(["ROMEO:\n"], [adapter], SamplingParams(max_tokens=12, ignore_eos=True))[0]
        assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length"
        assert got.usage.completion_tokens == 12 and got.usage.prompt_tokens == want.prompt_tokens
    messages = [{"role": "user", "content": "Who loves the moon?"}]
    chat = c.chat.completions.create(model="ad2", messages=messages, max_tokens=10, temperature=0)
    want = py.generate([py.chat_prompt(messages)], ["ad2"], SamplingParams(max_tokens=10))[0]
    assert chat.choices[0].message.content == want.text and chat.choices[0].finish_reason == want.finish_reason
    stream = c.chat.completions.create(model="ad2", messages=messages, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert chunks[-1].usage.completion_tokens == want.completion_tokens
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model="ad0", prompt="NURSE", max_tokens=8, temperature=0, stream=True))
    assert text == py.generate(["NURSE"], ["ad0"], SamplingParams(max_tokens=8))[0].text


def test_concurrent_requests_batch_and_each_is_right(server, chat_model):
    url, _ = server
    c = client(url)
    py = engine_for(chat_model)
    rows = ROWS * 2  # ten requests over a batch of at most four: they join and leave as they come and go
    want = [py.generate([p], [a], SamplingParams(max_tokens=6 + i, ignore_eos=True))[0].text
            for i, (p, a) in enumerate(zip(PROMPTS * 2, rows, strict=True))]
    got = [None] * len(rows)

    def ask(i):
        got[i] = c.completions.create(model=rows[i] or "base", prompt=(PROMPTS * 2)[i], max_tokens=6 + i,
                                      temperature=0, extra_body={"ignore_eos": True}).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(rows))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want


def test_server_errors_are_openai_shaped(server, chat_model):
    import httpx
    import openai

    url, _ = server
    c = client(url)
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="nope", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "nope" in e.value.body["message"]
    for bad in ({"model": "base"}, {"model": "base", "prompt": "x", "max_tokens": 0},
                {"model": "base", "prompt": "x", "temperature": -1}, {"model": "base", "prompt": "x", "n": 2},
                {"model": "base", "prompt": "x", "presence_penalty": 0.5}, {"model": "base", "prompt": [[]]},
                {"model": "base", "prompt": "x", "guided_json": {"type": "object"}},
                {"model": "base", "messages": []}):
        path = "/v1/chat/completions" if "messages" in bad else "/v1/completions"
        r = httpx.post(url + path, json=bad)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (bad, r.text)
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = httpx.post(url + "/v1/completions", json={"model": "base", "prompt": "x" * 2000, "max_tokens": 4})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    other = make_adapters(make_qwen(chat_model), chat_model[2][0].parent / "other_ad", "nf4", specs=SPECS[:1])[0]
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(other)})
    assert r.status_code == 400 and "different base" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "nope"})
    assert r.status_code == 404
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "base", "lora_path": str(chat_model[2][0])})
    assert r.status_code == 400 and "base model's name" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={"model": "ad0", "prompt": "ROMEO", "max_tokens": 3,
                                                  "temperature": None, "top_p": None, "user": "someone"})
    assert r.status_code == 200  # null sampling fields take OpenAI's defaults


def make_qwen(chat_model):
    folder = chat_model[2][0].parent / "qwen_base"
    if not folder.exists():
        make_model("qwen2").save_pretrained(folder)
    return folder


def test_adapters_load_and_unload_at_runtime(server, chat_model):
    import httpx

    url, eng = server
    c = client(url)
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": str(chat_model[2][1])})
    assert r.status_code == 200 and r.json()["bytes"] > 0
    got = c.completions.create(model="fresh", prompt="ROMEO", max_tokens=6, temperature=0).choices[0].text
    assert got == c.completions.create(model="ad1", prompt="ROMEO", max_tokens=6, temperature=0).choices[0].text
    assert "fresh" in [m.id for m in c.models.list().data]
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 200
    r = httpx.post(url + "/v1/completions", json={"model": "fresh", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_client_that_leaves_mid_stream_frees_its_row(server):
    import httpx

    url, eng = server
    body = {"model": "ad0", "prompt": "ROMEO", "max_tokens": 240, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as r:
        events = (json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {"))
        got = list(itertools.islice(events, 3))
    assert len(got) == 3
    deadline = time.time() + 20
    while (eng.running or eng.waiting) and time.time() < deadline:
        time.sleep(0.05)
    assert not eng.running and not eng.waiting
    health = httpx.get(url + "/health").json()
    assert health["running"] == 0


@pytest.mark.slow
def test_cli_serve_streams_and_stops_on_sigterm(chat_model):
    folder, _, paths = chat_model
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "qlora_kit", "serve", "--model", str(folder), "--adapter",
                             f"alice={paths[0]}", "--port", str(port)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "serving" in line:
                break
        assert "serving" in lines[-1], "".join(lines)
        c = client(f"http://127.0.0.1:{port}")
        text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="alice", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, stream=True)
            if ch.choices)
        assert isinstance(text, str)
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[1]
    finally:
        proc.kill()
    assert proc.returncode == 0, rest
    assert "alice: " in rest and "generated tokens" in rest  # the request's log line
    assert rest.strip().endswith("server stopped")


def test_cli_serve_refuses_bad_input_in_one_line(chat_model, capsys):
    from qlora_kit.cli import main

    folder, _, paths = chat_model
    other = make_adapters(make_qwen(chat_model), chat_model[2][0].parent / "other_ad2", "nf4", specs=SPECS[:1])[0]
    capsys.readouterr()  # the fixtures' own output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        cases = [(["--adapter", "no-equals-sign"], "expected NAME=DIR"),
                 (["--adapter", f"a={paths[0]}", "--adapter", f"a={paths[1]}"], "already taken"),
                 (["--adapter", f"x={other}", "--port", str(free_port())], "different base"),
                 (["--adapter", "x=/nowhere/at/all", "--port", str(free_port())], "no adapter_config.json"),
                 (["--port", str(busy)], f"cannot listen on 127.0.0.1:{busy}")]
        for extra, message in cases:
            assert main(["serve", "--model", str(folder), *extra]) == 2
            err = capsys.readouterr().err.strip()
            assert message in err and len(err.splitlines()) == 1, err
