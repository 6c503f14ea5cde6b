"""The GGUF target of a merge: one .gguf file that llama.cpp, Ollama and LM Studio run, and the adapter alone as
a GGUF LoRA file for llama.cpp's --lora.

What the file holds, as llama.cpp's own converter lays it out:
- metadata: the architecture's keys (sizes, heads, norm epsilon, rope), the tokenizer (tokens, merges,
  scores, token types, special ids, whether BOS is added) and the chat template;
- tensors under GGUF's names (blk.N.attn_q.weight ...), with the two changes llama.cpp's graphs expect:
  the Q and K rows of the llama family permuted from Hugging Face's rotate-half layout to llama.cpp's
  interleaved one, and Gemma's norm weights stored as 1 + w;
- types: norms and biases in F32; the linear layers in the export type; the embedding (and an untied head)
  in Q8_0 for the 4/5-bit types, as llama.cpp's own 4-bit files keep them, else in the export type.

The file is written the way the streamed merge produces tensors: its header (every tensor's name, shape,
type and offset are known from the model's shapes before any work) goes first, then each tensor is
written at its offset as it arrives, so no tensor waits in memory. It is written under a temporary name
and renamed when complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from . import gguf_types
from .config import GGUF_QUANTS, LoraExportConfig, MergeConfig
from .layers import QuantLinear

ALIGNMENT = 32  # GGUF's default data alignment


@dataclass(frozen=True)
class Family:
    """How one Hugging Face model type maps onto a llama.cpp architecture."""

    arch: str  # general.architecture
    permute_qk: bool = False  # llama.cpp's llama graph uses interleaved rope: Q/K rows permuted
    norm_plus_one: bool = False  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w


FAMILIES = {
    "llama": Family("llama", permute_qk=True),  # also SmolLM2
    "mistral": Family("llama", permute_qk=True),  # llama.cpp runs Mistral as llama
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3"),
    "gemma2": Family("gemma2", norm_plus_one=True),
    "gemma3_text": Family("gemma3", norm_plus_one=True),
}
_ROPE_SCALING = ("default", "linear", "llama3")


def family(config, where: str | os.PathLike) -> Family:
    """The family of a model config; a model type (or rope scaling) with no GGUF mapping is refused."""
    mt = getattr(config, "model_type", None)
    if mt not in FAMILIES:
        archs = ",".join(getattr(config, "architectures", None) or []) or "?"
        raise ValueError(f"{where}: model type {mt!r} ({archs}) has no GGUF mapping here; GGUF export supports "
                         f"{', '.join(FAMILIES)}")
    kind = _rope(config)[1].get("rope_type", "default")
    if kind not in _ROPE_SCALING:
        raise ValueError(f"{where}: rope scaling {kind!r} has no GGUF mapping here (supported: "
                         f"{', '.join(_ROPE_SCALING)})")
    return FAMILIES[mt]


def _rope(config) -> tuple[float, dict]:
    """(rope theta, rope parameters) of the full-attention layers, from either config layout."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "full_attention" in params:  # per layer type (Gemma 3)
        params = params["full_attention"]
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), dict(params)


def _arch(fam: Family):
    """The gguf package's MODEL_ARCH for a family (refused when the installed gguf predates it)."""
    import gguf

    arch = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == fam.arch), None)
    if arch is None:
        raise ValueError(f"the installed gguf package ({getattr(gguf, '__version__', '?')}) does not know the "
                         f"{fam.arch!r} architecture; upgrade it (pip install -U gguf)")
    return arch


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# ---- tensors ---------------------------------------------------------------------------------------------

@dataclass
class Planned:
    name: str  # GGUF name
    shape: tuple[int, ...]  # Hugging Face order (out, in)
    type: str  # f32 / f16 / bf16 / a GGUF block type
    heads: int | None = None  # Q or K of the llama family: rows permuted within this many heads
    plus_one: bool = False  # a Gemma norm: stored as 1 + w


def _dense_type(cfg: MergeConfig) -> str:
    return {"bf16": "bf16", "fp16": "f16", "fp32": "f32"}[cfg.format] if not cfg.quantized else "q8_0"


def tensor_plan(model: nn.Module, config, fam: Family, cfg: MergeConfig,
                untied: tuple[str, str] | None = None) -> dict[str, Planned]:
    """Checkpoint key -> GGUF name, shape, type and the permutation / norm offset, for every tensor the export writes (from the shapes
    of the meta model: no weight is read). Raises ValueError for a tensor with no GGUF name."""
    import gguf

    names = gguf.get_tensor_name_map(_arch(fam), config.num_hidden_layers)
    linear_type = cfg.format if cfg.quantized else _dense_type(cfg)
    other_type = _dense_type(cfg)
    plan: dict[str, Planned] = {}
    seen: set[int] = set()
    linears = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for mname, module in model.named_modules():
        if isinstance(module, QuantLinear):
            tensors = [("weight", (module.out_features, module.in_features), True)]
            if module.bias is not None:
                tensors.append(("bias", tuple(module.bias.shape), False))
        elif mname.rpartition(".")[0] in linears:
            continue
        else:
            tensors = []
            for pname, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if id(p) in seen or pname in getattr(module, "_non_persistent_buffers_set", set()):
                    continue
                seen.add(id(p))
                tensors.append((pname, tuple(p.shape), False))
        for pname, shape, is_linear in tensors:
            key = f"{mname}.{pname}" if mname else pname
            gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise ValueError(f"{key}: tensor has no GGUF name for architecture {fam.arch!r}")
            if len(shape) == 1:
                t = "f32"
            else:
                t = linear_type if is_linear else other_type
                if t in GGUF_QUANTS and not gguf_types.fits(t, shape[-1]):
                    t = "f16"  # rows that do not split into blocks of 32 stay 16-bit, as llama.cpp's converter does
            plan[key] = Planned(gname, shape, t, permuted_heads(gname, config, fam),
                                fam.norm_plus_one and gname.endswith("norm.weight"))
    if untied and untied[1] not in plan and untied[0] in plan:  # the checkpoint's own head, though the config ties
        plan[untied[1]] = Planned(names.get_name(untied[1], try_suffixes=(".weight",)) or "output.weight",
                                  plan[untied[0]].shape, plan[untied[0]].type)
    return plan


_DENSE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def permuted_heads(gname: str, config, fam: Family) -> int | None:
    """The head count whose rows llama.cpp's rotary layout permutes, for a Q or K tensor (weight, bias, or a
    LoRA factor of one) of the llama family; None for every other tensor."""
    if not fam.permute_qk:
        return None
    if gname.endswith(("attn_q.weight", "attn_q.bias")):
        return config.num_attention_heads
    if gname.endswith(("attn_k.weight", "attn_k.bias")):
        return config.num_key_value_heads
    return None


def permute_rows(w: Tensor, n_head: int) -> Tensor:
    """Rows of a Q or K projection (or of its bias, or LoRA B) from Hugging Face's rotate-half order to
    llama.cpp's interleaved order: within each head, row pairs (i, i + d/2) become neighbours."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def stored_dense(t: Tensor, planned: Planned) -> Tensor:
    """The fp32 value a reader gets back for a non-linear tensor stored as `planned` (what the export's
    evaluation computes with)."""
    x = t.detach().float()
    if planned.type in GGUF_QUANTS:
        return gguf_types.fake_quantize(x, planned.type)  # a slice of rows at a time
    if planned.plus_one:
        return (x + 1) - 1
    return x.to(_DENSE[planned.type]).float()


def _payload(t: Tensor, planned: Planned, config) -> np.ndarray:
    """The bytes of one tensor as the file stores it."""
    if t.dtype == torch.uint8:  # packed GGUF blocks, (out, row bytes)
        data = t
    else:
        x = t.detach().float()
        if planned.plus_one:
            x = x + 1
        if planned.type in GGUF_QUANTS:
            data = gguf_types.quantize(x, planned.type)["blocks"]
        else:
            data = x.to(_DENSE[planned.type])
    if planned.heads:
        data = permute_rows(data, planned.heads)
    data = data.contiguous()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    return data.numpy().view(np.uint8).reshape(-1)


class GGUFFile:
    """A GGUF file written header first, then each tensor at its offset as it arrives (in any order)."""

    def __init__(self, path: Path, arch: str, kv, plan: dict[str, Planned], config):
        import gguf

        self.path, self.plan, self.config = Path(path), plan, config
        w = gguf.GGUFWriter(str(self.path), arch)
        kv(w)
        self.offsets: dict[str, int] = {}
        self.nbytes: dict[str, int] = {}
        offset = 0
        for key, p in plan.items():
            n = gguf_types.nbytes(p.type, p.shape)
            w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), n, raw_dtype=gguf_types.ggml_type(p.type))
            self.offsets[key], self.nbytes[key] = offset, n
            offset += -(-n // ALIGNMENT) * ALIGNMENT
        self.total = offset  # the data alone, until the header's size is known
        try:
            self._guard(lambda: (w.write_header_to_file(), w.write_kv_data_to_file(), w.write_ti_data_to_file()))
            f = w.fout[0]
            start = f.tell()
            self.data_start = -(-start // ALIGNMENT) * ALIGNMENT
            self._guard(lambda: (f.write(b"\0" * (self.data_start - start)), f.flush()))
        finally:
            w.close()
        self.total = self.data_start + offset
        self.fd = os.open(self.path, os.O_RDWR)
        self.keys: set[str] = set()
        self.written = 0

    def add(self, key: str, tensor: Tensor, dtype: torch.dtype | None = None) -> None:
        """Write one tensor (dense, or packed GGUF blocks) at its place; `dtype` is ignored (the plan says)."""
        if key not in self.plan:
            raise ValueError(f"tensor {key!r} is not in the GGUF export's plan")
        if key in self.keys:
            raise ValueError(f"tensor {key!r} written twice")
        data = _payload(tensor.detach().cpu(), self.plan[key], self.config)
        if data.nbytes != self.nbytes[key]:
            raise ValueError(f"tensor {key!r}: {data.nbytes} bytes, the plan says {self.nbytes[key]}")
        pos = self.data_start + self.offsets[key]
        view = memoryview(data)
        self._guard(lambda: self._pwrite(view, pos))
        self.keys.add(key)
        self.written += data.nbytes

    def _pwrite(self, view: memoryview, pos: int) -> None:
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:done + (64 << 20)], pos + done)

    def close(self) -> None:
        try:
            missing = [k for k in self.plan if k not in self.keys]
            if missing:
                raise RuntimeError(f"{self.path}: {len(missing)} tensors were never written (first: {missing[0]})")
            self._guard(lambda: (os.ftruncate(self.fd, self.total), os.fsync(self.fd)))
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the file (the merge failed: its temporary name is removed by the caller)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _guard(self, fn) -> None:
        try:
            fn()
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                free = shutil.disk_usage(self.path.parent).free
                raise OSError(e.errno, f"{self.path.parent}: disk full while writing the GGUF file ({free / 2**20:.0f} "
                                       f"MiB free; it needs {self.total / 2**20:.0f} MiB or more); nothing "
                                       "was written") from None
            raise


# ---- metadata -------------------------------------------------------------------------------------------

def file_type(cfg: MergeConfig) -> int:
    import gguf

    name = {"fp32": "ALL_F32", "fp16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}.get(cfg.format)
    return int(gguf.LlamaFileType[name or f"MOSTLY_{cfg.format.upper()}"])


def model_kv(w, config, fam: Family, cfg: MergeConfig, name: str) -> None:
    """general.* and the architecture's keys, as llama.cpp reads them."""
    import gguf

    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(file_type(cfg))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(config.vocab_size)
    theta, rope = _rope(config)
    w.add_rope_freq_base(theta)
    hd = head_dim(config)
    if fam.arch == "llama":
        w.add_rope_dimension_count(hd)
    if hd != config.hidden_size // config.num_attention_heads or fam.arch != "llama":
        w.add_key_length(hd)
        w.add_value_length(hd)
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if fam.arch in ("gemma2", "gemma3") and getattr(config, "sliding_window", None):
        w.add_sliding_window(int(config.sliding_window))
    if fam.arch == "gemma2":
        if config.attn_logit_softcapping is not None:
            w.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        if config.final_logit_softcapping is not None:
            w.add_final_logit_softcapping(float(config.final_logit_softcapping))


def rope_freqs(config) -> Tensor | None:
    """Llama 3's rope scaling as llama.cpp takes it: one factor per rotary frequency (the rope_freqs tensor)."""
    theta, rope = _rope(config)
    if rope.get("rope_type") != "llama3":
        return None
    hd = head_dim(config)
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


# ---- tokenizer ------------------------------------------------------------------------------------------

_CONTROL, _USER_DEFINED, _NORMAL, _UNKNOWN, _UNUSED, _BYTE = 3, 4, 1, 2, 5, 6


def tokenizer_kv(src: Path, tok, source_gguf: Path | None, fam: Family, vocab_size: int | None = None):
    """A function adding the tokenizer's keys to a GGUFWriter. A model that came from a GGUF file keeps that
    file's tokenizer keys exactly; otherwise they are built from tokenizer.json (byte-level BPE -> 'gpt2';
    sentencepiece BPE with byte fallback or Unigram -> 'llama'). Raises ValueError for a tokenizer GGUF cannot
    represent, before any work."""
    if source_gguf is not None:
        return _copied_tokenizer(source_gguf)
    path = src / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{src}: no tokenizer.json (a fast tokenizer); GGUF needs the vocabulary and merges it holds")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    kind = model.get("type")
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    if kind == "BPE":
        vocab = dict(model["vocab"])
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        byte_level = _has(tj.get("pre_tokenizer"), "ByteLevel") or _has(tj.get("decoder"), "ByteLevel")
        if not byte_level and not model.get("byte_fallback"):
            raise ValueError(f"{path}: a BPE tokenizer that is neither byte-level nor byte-fallback cannot be "
                             "represented in GGUF")
        ggml_model = "gpt2" if byte_level else "llama"
        scores = None
    elif kind == "Unigram":
        vocab = {piece: i for i, (piece, _) in enumerate(model["vocab"])}
        scores_by_id = [float(s) for _, s in model["vocab"]]
        merges, ggml_model = [], "llama"
        scores = scores_by_id
    else:
        raise ValueError(f"{path}: a {kind or 'unknown'} tokenizer cannot be represented in GGUF (it stores BPE or "
                         "Unigram vocabularies)")
    for i, a in added.items():
        vocab.setdefault(a["content"], i)
    n = max(max(vocab.values()) + 1, len(tok))
    if vocab_size is not None:  # llama.cpp wants one token per embedding row
        if n > vocab_size:
            raise ValueError(f"{path}: the tokenizer has ids up to {n - 1}, beyond the model's {vocab_size} "
                             "embedding rows")
        n = vocab_size
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [_UNUSED] * n  # ids with no token (rows past the vocabulary): padding, as llama.cpp's converter writes
    for t, i in vocab.items():
        tokens[i], types[i] = t, _NORMAL
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"{path}: the vocabulary spells two ids the same way; GGUF cannot represent it")
    for i, a in added.items():
        types[i] = _CONTROL if a.get("special") else _USER_DEFINED
    unk = model.get("unk_token")
    for i, t in enumerate(tokens):
        if ggml_model == "llama" and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types[i] = _BYTE  # sentencepiece's byte fallback pieces, even when listed as added tokens
        if unk is not None and t == unk:
            types[i] = _UNKNOWN
    if scores is None and ggml_model == "llama":
        scores = [-float(i) if types[i] == _NORMAL else 0.0 for i in range(n)]  # merge priority by id
    elif scores is not None:
        scores = scores + [0.0] * (n - len(scores))
    pre = _pre_tokenizer(tj, fam) if ggml_model == "gpt2" else None
    bos, eos, unk_id, pad = tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id
    probe = tok("a")["input_ids"]
    add_bos = bool(bos is not None and probe and probe[0] == bos)
    template = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None

    def add(w) -> None:
        w.add_tokenizer_model(ggml_model)
        if pre is not None:
            w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        if scores is not None:
            w.add_token_scores(scores)
        if merges:
            w.add_token_merges(merges)
        for setter, value in ((w.add_bos_token_id, bos), (w.add_eos_token_id, eos), (w.add_unk_token_id, unk_id),
                              (w.add_pad_token_id, pad)):
            if value is not None:
                setter(int(value))
        w.add_add_bos_token(add_bos)
        if ggml_model == "llama":
            w.add_add_space_prefix(_has(tj.get("pre_tokenizer"), "Metaspace") or _has(tj.get("normalizer"), "Prepend"))
        if template:
            w.add_chat_template(template)

    return add


def _has(node, kind: str) -> bool:
    """Whether a tokenizer.json component (or a Sequence of them) contains one of type `kind`."""
    if isinstance(node, dict):
        return node.get("type") == kind or any(_has(v, kind) for v in node.values() if isinstance(v, (dict, list)))
    if isinstance(node, list):
        return any(_has(v, kind) for v in node)
    return False


def _pre_tokenizer(tj: dict, fam: Family) -> str:
    """llama.cpp's name for the byte-level pre-tokenizer: found by its split pattern among the names transformers'
    GGUF reader knows, else by family, else 'default' (GPT-2's pattern)."""
    patterns = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if node.get("type") == "Split":
                pat = node.get("pattern") or {}
                patterns.append(pat.get("Regex") or pat.get("String"))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(tj.get("pre_tokenizer"))
    with contextlib.suppress(ImportError):
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
            if regex in patterns:
                return name
    return {"qwen2": "qwen2", "qwen3": "qwen2"}.get(fam.arch, "default")


def _copied_tokenizer(source: Path):
    """The tokenizer.* keys of a GGUF file, to be written unchanged."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    fields = []
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        fields.append((key, f.contents(), vtype, sub))
    del reader

    def add(w) -> None:
        for key, value, vtype, sub in fields:
            w.add_key_value(key, value, vtype, sub_type=sub)

    return add


# ---- the merge's GGUF target -------------------------------------------------------------------------------

class Target:
    """What the streamed merge needs to write one GGUF file: the tensor plan, the metadata, the writer, and the
    values a reader gets back for the tensors outside the linear layers. Everything a model or tokenizer could
    fail on is checked here, before any work."""

    def __init__(self, cfg: MergeConfig, model: nn.Module, config, src: Path, tok, expert_stacks: int,
                 untied: tuple[str, str] | None = None):
        from . import defaults

        self.cfg, self.config = cfg, config
        self.fam = family(config, src)
        if expert_stacks:
            raise ValueError(f"{src}: GGUF export of expert stacks (mixture-of-experts) is not supported; export a "
                             "bitsandbytes or bf16 folder instead")
        self.plan = tensor_plan(model, config, self.fam, cfg, untied)
        if cfg.quantized:
            for key, p in self.plan.items():
                if len(p.shape) == 2 and not gguf_types.fits(cfg.format, p.shape[1]):
                    raise ValueError(f"{key}: rows of {p.shape[1]} values do not split into GGUF's blocks of "
                                     f"{gguf_types.BLOCK}; export f16/bf16 instead")
        self.freqs = rope_freqs(config)
        if self.freqs is not None:  # Llama 3's rope scaling travels as a tensor of per-frequency factors
            self.plan["rope_freqs"] = Planned("rope_freqs.weight", tuple(self.freqs.shape), "f32")
        try:
            source = defaults.resolve_model(cfg.model)
        except (OSError, ValueError):
            source = None
        source = source if source is not None and source.suffix == ".gguf" and source.is_file() else None
        self.tokenizer = tokenizer_kv(src, tok, source, self.fam, config.vocab_size)
        self.name = source.stem if source is not None else Path(str(src)).name

    def kv(self, w) -> None:
        model_kv(w, self.config, self.fam, self.cfg, f"{self.name} (merged)")
        self.tokenizer(w)

    def writer(self, path: Path) -> GGUFFile:
        f = GGUFFile(path, self.fam.arch, self.kv, self.plan, self.config)
        if self.freqs is not None:
            f.add("rope_freqs", self.freqs)
        return f

    def stored(self, key: str, t: Tensor) -> Tensor | None:
        """The fp32 value a reader gets back for a tensor outside the linear layers (None: the tensor itself)."""
        p = self.plan.get(key)
        if p is None or (p.type == "f32" and not p.plus_one and t.dtype == torch.float32):
            return None
        return stored_dense(t, p)

    def summary(self) -> dict:
        types: dict[str, int] = {}
        for p in self.plan.values():
            types[p.type] = types.get(p.type, 0) + 1
        return {"architecture": self.fam.arch, "file_type": self.cfg.format, "tensors": len(self.plan),
                "tensor_types": types, "qk_permuted": self.fam.permute_qk,
                "bytes": sum(gguf_types.nbytes(p.type, p.shape) for p in self.plan.values())}


# ---- the adapter alone: a GGUF LoRA file for llama.cpp's --lora ---------------------------------------------

def export_lora(cfg: LoraExportConfig, log=print) -> dict:
    """Write the adapter cfg.adapter (PEFT layout) as a GGUF LoRA file for the base cfg.model.

    llama.cpp adds scale * B A to each layer with scale = adapter.lora.alpha / r (r from the tensor's shape),
    times the --lora-scaled factor. Where the adapter's own scale differs (rsLoRA, alpha_pattern, rank_pattern)
    the difference is folded into B, so every layer keeps its exact update. B's rows get the Q/K permutation the
    base's Q/K rows got. Factors are stored in F32.

    Returns: a summary (tensors, alpha, bytes). Raises ValueError / FileExistsError before any work.
    """
    import gguf

    from . import defaults
    from .adapters import BASE_QUANT, apply_adapter, read_adapter
    from .config import QuantConfig
    from .io import atomic_file
    from .memory.models import meta_quantized
    from .patch import lora_layers

    out = Path(cfg.out)
    if not out.name.endswith(".gguf"):
        raise ValueError(f"{out}: a GGUF LoRA file name ends in .gguf")
    if out.exists() and not cfg.force:
        raise FileExistsError(f"{out}: already exists (use --force to replace it)")
    src = defaults.model_folder(cfg.model, cfg.cache_dir)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(src, local_files_only=True)
    fam = family(config, src)
    adapter_cfg, pairs = read_adapter(cfg.adapter)
    trained = adapter_cfg.get(BASE_QUANT) or {"quant": "nf4", "blocksize": 64, "double_quant": True}
    qcfg = QuantConfig(quant=trained["quant"], compute_dtype=torch.float32, double_quant=trained["double_quant"],
                       blocksize=trained["blocksize"])
    model = meta_quantized(config, qcfg, "cpu")
    apply_adapter(model, Path(cfg.adapter), adapter_cfg, pairs)  # refuses an adapter for another base
    layers = lora_layers(model)
    names = gguf.get_tensor_name_map(_arch(fam), config.num_hidden_layers)
    alpha = float(adapter_cfg.get("lora_alpha", 8))
    if alpha == 0:
        raise ValueError(f"{cfg.adapter}: lora_alpha is 0, which a GGUF LoRA file cannot express (llama.cpp reads "
                         "alpha 0 as scale 1)")
    tensors = []
    for name, (a, b) in pairs.items():
        layer = layers.get(name)
        if layer is None:
            raise ValueError(f"{cfg.adapter}: {name!r} is an expert of a stack; GGUF LoRA export of mixture-of-experts "
                             "adapters is not supported")
        gname = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if gname is None:
            raise ValueError(f"{name}: layer has no GGUF name for architecture {fam.arch!r}")
        r = a.shape[0]
        b = b.float() * (float(layer.scaling) / (alpha / r))  # llama.cpp's scale is alpha / r
        heads = permuted_heads(gname, config, fam)
        if heads:
            b = permute_rows(b, heads)
        tensors += [(f"{gname}.lora_a", a.float().contiguous()), (f"{gname}.lora_b", b.contiguous())]
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), fam.arch)
        try:
            w.add_type(gguf.GGUFType.ADAPTER)
            w.add_string(gguf.Keys.Adapter.TYPE, "lora")
            w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            w.add_name(f"{Path(cfg.adapter).name} (LoRA)")
            for tname, t in tensors:
                w.add_tensor(tname, t.numpy())
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    summary = {"out": str(out), "architecture": fam.arch, "layers": len(pairs), "alpha": alpha,
               "bytes": out.stat().st_size, "qk_permuted": fam.permute_qk}
    log(f"GGUF LoRA written to {out}: {len(pairs)} layers, alpha {alpha:g}, {summary['bytes'] / 2**20:.1f} MiB "
        f"(llama.cpp: llama-cli -m BASE.gguf --lora {out.name})")
    return summary
