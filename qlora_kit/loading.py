"""Streaming quantized loader: a Hugging Face checkpoint in, a frozen quantized model out.

The model is first built as a skeleton whose parameters live on the meta device (no memory);
then the safetensors files are read one tensor at a time. A target linear weight is quantized
the moment it arrives and only its packed form is kept, so peak host memory stays near the
final quantized model plus the largest single tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from . import defaults
from .config import QuantConfig, one_line, resolve_compute_dtype
from .layers import QuantLinear
from .patch import fingerprint, linear_names, output_head, set_submodule


def load_quantized(path: str | os.PathLike, quant: str = "nf4", compute_dtype: torch.dtype | str | None = None,
                   double_quant: bool = True, blocksize: int = 64, device: str | torch.device = "cpu",
                   int8_threshold: float = 0.0, skip: list[str] | None = None,
                   cache_dir: str | os.PathLike | None = None) -> nn.Module:
    """Load a causal LM with every linear layer but the output head quantized and frozen.

    Args:
        path: a Hugging Face model folder (config.json + model.safetensors, or shards with
            model.safetensors.index.json), or a .gguf file (converted once into a cached folder).
        quant: 'nf4', 'fp4', 'int8', or 'none' (keep the weights in compute_dtype).
        compute_dtype: dtype of the matmuls and of the weights left unquantized;
            default bf16 on CUDA, fp32 on CPU.
        double_quant, blocksize, int8_threshold: see QuantConfig.
        device: where the weights go ('cpu' or 'cuda').
        skip: names (or dotted-path suffixes) of linear layers to keep unquantized.
        cache_dir: where converted GGUF models are kept (default ~/.cache/qlora-kit).
    Returns:
        A transformers model in eval mode, every parameter frozen.
    Raises:
        FileNotFoundError, ValueError: with one line naming the file or tensor at fault.
    """
    device = check_device(device)
    cfg = QuantConfig(quant=quant, compute_dtype=resolve_compute_dtype(compute_dtype, device),
                      double_quant=double_quant, blocksize=blocksize, int8_threshold=int8_threshold)
    path = Path(path)
    if path.suffix == ".gguf":
        from .gguf import gguf_to_hf_dir
        path = gguf_to_hf_dir(path, cache_dir=cache_dir)
    files = checkpoint_files(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises several types for a bad config
        raise ValueError(f"{path / 'config.json'}: cannot read model config ({one_line(e)})") from None
    model = _skeleton(config, cfg)
    targets = set(linear_names(model))
    if skip:
        targets = {n for n in targets if not any(n == s or n.endswith("." + s) for s in skip)}
    _StreamingFill(model, targets, cfg, device).run(files)
    return _loaded(model, cfg, str(path))


def load_from_tensors(config, tensors: Callable[[dict[str, torch.Tensor]], Iterable[tuple[str, torch.Tensor]]],
                      cfg: QuantConfig, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model of `config` quantized like load_quantized, its tensors from `tensors(expected)`.

    `tensors` gets the skeleton's state dict (names -> meta tensors of the right shape and dtype) and
    yields (name, tensor) pairs, one at a time; e.g. random values for a memory measurement.
    """
    device = check_device(device)
    model = _skeleton(config, cfg)
    fill = _StreamingFill(model, set(linear_names(model)), cfg, device)
    seen: set[int] = set()
    expected = {}
    for name, t in fill.expected.items():  # a tied weight is one tensor under two names: fill it once
        if id(t) not in seen:
            seen.add(id(t))
            expected[name] = t
    for name, tensor in tensors(expected):
        fill.place(Path("<generated>"), name, name, tensor)
    fill.finish()
    return _loaded(model, cfg, None)


def _skeleton(config, cfg: QuantConfig) -> nn.Module:
    with _params_on_meta():
        return AutoModelForCausalLM.from_config(config, dtype=cfg.compute_dtype)


def _loaded(model: nn.Module, cfg: QuantConfig, path: str | None) -> nn.Module:
    """A filled model, in eval mode, tagged with how it was quantized and where it came from."""
    model.eval()
    model.qlora_quant_config = cfg
    model.qlora_source = {"path": path, "fingerprint": fingerprint(model)}
    return model


def load_model_and_tokenizer(model: str, cfg: QuantConfig, device: str | torch.device = "cpu",
                             cache_dir: str | None = None) -> tuple[nn.Module, object]:
    """Resolve --model (a folder, a .gguf, or the embedded default), then load it quantized with its tokenizer."""
    path = defaults.model_folder(model, cache_dir)
    net = load_quantized(path, quant=cfg.quant, compute_dtype=cfg.compute_dtype, double_quant=cfg.double_quant,
                         blocksize=cfg.blocksize, int8_threshold=cfg.int8_threshold, device=device)
    return net, load_tokenizer(path)


def load_tokenizer(path: Path):
    """The tokenizer saved in a model folder, or a one-line error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot load a tokenizer from the model folder ({one_line(e)})") from None


def check_seq_len(model_or_config, seq_len: int) -> None:
    """Refuse a sequence length beyond the context of a model (or of its transformers config)."""
    config = getattr(model_or_config, "config", model_or_config)
    max_ctx = getattr(config.get_text_config(), "max_position_embeddings", None)
    if max_ctx is not None and seq_len > max_ctx:
        raise ValueError(f"--seq-len {seq_len} is beyond the model's context of {max_ctx} tokens")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(check_device(device))


def check_device(device: str | torch.device) -> torch.device:
    """A usable device for the weights, or a one-line error."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name; use 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder, in index order. Pickled weights are never read."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder")
    if not path.is_dir():
        raise ValueError(f"{path}: expected a model folder (config.json + *.safetensors) or a .gguf file")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json in the model folder")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({one_line(e)})") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if f.resolve().parent != path.resolve():
                raise ValueError(f"{index}: shard {f.name!r} lies outside the model folder")
            if not f.is_file():
                raise FileNotFoundError(f"{f}: shard listed in {index.name} is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {pickled[0]}: pickled weights are never loaded; convert them to safetensors)" if pickled else ""
        raise FileNotFoundError(f"{path}: no *.safetensors weights{hint}")
    return files


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device while buffers stay real.

    Buffers such as rotary inverse frequencies are computed in __init__ and never stored in the
    checkpoint, so they must be real; parameters come from the files.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


class _StreamingFill:
    """Fill a meta skeleton from safetensors files, one tensor at a time."""

    def __init__(self, model: nn.Module, targets: set[str], cfg: QuantConfig, device: torch.device):
        self.model, self.targets, self.cfg, self.device = model, targets, cfg, device
        self.expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.pending_bias: dict[str, torch.Tensor] = {}  # target layer -> bias that arrived before its weight
        self.done: set[str] = set()
        self.ignored: list[str] = []

    def run(self, files: list[Path]) -> None:
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as e:
                raise ValueError(f"{file}: not a readable safetensors file ({one_line(e)})") from None
            with handle as f:
                for key in f.keys():
                    name = self._model_key(key)
                    if name is None:
                        self.ignored.append(key)
                        continue
                    try:
                        tensor = f.get_tensor(key)
                    except Exception as e:
                        raise ValueError(f"{file}: tensor {key!r} cannot be read, the file may be truncated "
                                         f"({one_line(e)})") from None
                    self.place(file, key, name, tensor)
                    del tensor
        self.finish()

    def _model_key(self, key: str) -> str | None:
        # Checkpoints differ in whether keys carry the base model's prefix ("transformer.", "model.").
        if key in self.expected:
            return key
        if self.prefix and f"{self.prefix}.{key}" in self.expected:
            return f"{self.prefix}.{key}"
        if self.prefix and key.startswith(self.prefix + ".") and key[len(self.prefix) + 1:] in self.expected:
            return key[len(self.prefix) + 1:]
        return None

    def place(self, file: Path, key: str, name: str, tensor: torch.Tensor) -> None:
        want = tuple(self.expected[name].shape)
        if tuple(tensor.shape) != want:
            raise ValueError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)} but the model's config "
                             f"expects {want}")
        module_name, _, leaf = name.rpartition(".")
        if module_name in self.targets and leaf in ("weight", "bias"):
            if leaf == "bias":
                layer = self.model.get_submodule(module_name)
                if isinstance(layer, QuantLinear):
                    layer.bias = nn.Parameter(tensor.to(self.device, self.cfg.compute_dtype), requires_grad=False)
                else:
                    self.pending_bias[module_name] = tensor
            else:
                if not tensor.is_floating_point():
                    raise ValueError(f"{file}: tensor {key!r} is {tensor.dtype}, expected floating-point weights")
                dense = self.model.get_submodule(module_name)
                try:
                    layer = QuantLinear.from_dense(tensor.to(self.device), self.cfg,
                                                   self.pending_bias.pop(module_name, None),
                                                   fan_in_fan_out=isinstance(dense, Conv1D))
                except ValueError as e:
                    raise ValueError(f"{file}: tensor {key!r}: {e}") from None
                set_submodule(self.model, module_name, layer.to(self.device))
        else:
            module = self.model.get_submodule(module_name) if module_name else self.model
            value = tensor.to(self.device, self.cfg.compute_dtype if tensor.is_floating_point() else tensor.dtype)
            if leaf in module._parameters:
                module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[leaf] = value
        self.done.add(name)

    def finish(self) -> None:
        model = self.model
        head, embed = output_head(model), model.get_input_embeddings()
        text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if head is not None and getattr(text_cfg, "tie_word_embeddings", False):
            if head.weight.is_meta or torch.equal(head.weight, embed.weight):
                head.weight = embed.weight  # tied: one tensor, two uses, as transformers does
            else:
                warnings.warn("config.json ties the output head to the embeddings, but the checkpoint has its own "
                              "different head weights: keeping them (untied), as transformers does", stacklevel=3)
        harmless = (".inv_freq", ".attn.bias", ".attn.masked_bias")
        unexpected = [k for k in self.ignored if not k.endswith(harmless)]
        if unexpected:
            warnings.warn(f"{len(unexpected)} checkpoint tensor(s) are not part of the model built from config.json "
                          f"and were skipped, first {unexpected[0]!r}", stacklevel=3)
        if self.pending_bias:
            name = next(iter(self.pending_bias))
            raise ValueError(f"checkpoint has a bias for {name!r} but no weight")
        missing = [n for n, t in [*model.named_parameters(remove_duplicate=False),
                                  *model.named_buffers(remove_duplicate=False)] if t.is_meta]
        missing += [f"{t}.bias" for t in self.targets if f"{t}.bias" in self.expected and f"{t}.bias" not in self.done]
        if missing:
            raise ValueError(f"checkpoint is missing tensor {missing[0]!r} ({len(missing)} missing in all); "
                             "is the folder complete and its config.json the right one?")
        # Buffers that were built on the host in __init__ (rotary frequencies) follow the weights.
        for module in model.modules():
            for key, buf in module._buffers.items():
                if buf is not None and buf.device != self.device:
                    module._buffers[key] = buf.to(self.device)
