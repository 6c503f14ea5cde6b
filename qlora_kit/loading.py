"""Streaming quantized loader: a Hugging Face checkpoint in, a frozen quantized model out.

The model is first built as a skeleton whose parameters live on the meta device (no memory);
then the safetensors files are read one tensor at a time. A target linear weight is quantized
the moment it arrives and only its packed form is kept, so peak host memory stays near the
final quantized model plus the largest single tensor.

Checkpoint keys are mapped onto the model with transformers' own conversions for the model type
(`transformers.conversion_mapping`): renames, and tensors transformers merges, such as one tensor per
expert fused into a 3-D expert stack. The pieces of one merged tensor are read together, merged by
transformers' operations and quantized one expert at a time, so a per-expert checkpoint peaks near
the quantized model plus about twice one layer's expert tensors (the pieces, then the fused stack).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from . import allocator, defaults, hub
from .config import QuantConfig, one_line, resolve_compute_dtype
from .experts import ExpertStack, expert_parameters, place_stack
from .layers import QuantLinear
from .patch import fingerprint, linear_names, output_head, set_submodule


def load_quantized(path: str | os.PathLike, quant: str = "nf4", compute_dtype: torch.dtype | str | None = None,
                   double_quant: bool = True, blocksize: int = 64, device: str | torch.device = "cpu",
                   int8_threshold: float = 0.0, skip: list[str] | None = None,
                   cache_dir: str | os.PathLike | None = None) -> nn.Module:
    """Load a causal LM with every linear layer but the output head quantized and frozen.

    Args:
        path: a Hugging Face model folder (config.json + model.safetensors, or shards with
            model.safetensors.index.json), a Hub ID 'org/name[@revision]' (see hub.hub_snapshot),
            or a .gguf file (converted once into a cached folder).
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
    name = path if hub.is_hub_id(path) else None  # 'org/name[@rev]': its snapshot in the Hugging Face cache
    path = hub.hub_snapshot(name) if name else Path(path)
    if path.suffix == ".gguf":
        from .gguf import gguf_to_hf_dir
        path = gguf_to_hf_dir(path, cache_dir=cache_dir)
    files = checkpoint_files(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises several types for a bad config
        raise ValueError(f"{path / 'config.json'}: cannot read model config ({one_line(e)})") from None
    model = _skeleton(config, cfg)
    targets = set(linear_names(model, device))
    skipped: set[str] = set()
    if skip:
        def skipped_name(n: str) -> bool:
            return any(n == s or n.endswith("." + s) for s in skip)
        targets = {n for n in targets if not skipped_name(n)}
        skipped = {n for n in expert_parameters(model) if skipped_name(n) or skipped_name(n.rpartition(".")[0])}
    _StreamingFill(model, targets, cfg, device, skipped).run(files)
    model = _loaded(model, cfg, str(path))
    if name:
        model.qlora_source["name"] = name  # what save_adapter records as the base
    return model


def load_from_tensors(config, tensors: Callable[[dict[str, torch.Tensor]], Iterable[tuple[str, torch.Tensor]]],
                      cfg: QuantConfig, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model of `config` quantized like load_quantized, its tensors from `tensors(expected)`.

    `tensors` gets the skeleton's state dict (names -> meta tensors of the right shape and dtype) and
    yields (name, tensor) pairs, one at a time; e.g. random values for a memory measurement.
    """
    device = check_device(device)
    model = _skeleton(config, cfg)
    fill = _StreamingFill(model, set(linear_names(model, device)), cfg, device)
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
    import transformers

    with _params_on_meta():
        try:
            return AutoModelForCausalLM.from_config(config, dtype=cfg.compute_dtype)
        except ValueError:  # a text config saved from a multimodal family: its class is named in the config
            cls = getattr(transformers, (getattr(config, "architectures", None) or [""])[0], None)
            if cls is None:
                raise
            return cls._from_config(config, dtype=cfg.compute_dtype)


def _loaded(model: nn.Module, cfg: QuantConfig, path: str | None) -> nn.Module:
    """A filled model, in eval mode, tagged with how it was quantized and where it came from."""
    model.eval()
    model.qlora_quant_config = cfg
    model.qlora_source = {"path": path, "fingerprint": fingerprint(model)}
    return model


def load_model_and_tokenizer(model: str, cfg: QuantConfig, device: str | torch.device = "cpu",
                             cache_dir: str | None = None) -> tuple[nn.Module, object]:
    """Resolve --model (a folder, a Hub ID, a .gguf or the default), then load it quantized with its tokenizer."""
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


@dataclass
class _Group:
    """Checkpoint tensors that become one model tensor: a single (maybe renamed) key, or the pieces a
    transformers WeightConverter merges (e.g. one tensor per expert into a 3-D expert stack)."""

    target: str
    sources: list[tuple[Path, str]]
    converter: object | None = None
    patterns: dict[str, str] = field(default_factory=dict)  # source key -> the converter pattern it matched


def _plan_groups(model: nn.Module, keys: list[tuple[Path, str]], expected: dict, ignored: list[str]) -> list[_Group]:
    """Map checkpoint keys onto the model's tensors with transformers' own checkpoint conversions for the
    model type (renames such as GPT-NeoX's embed_out -> lm_head, per-expert tensors fused into 3-D
    stacks), keeping the order in which the tensors lie in the files. Only key names are read here."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    transforms = get_model_conversion_mapping(model) if hasattr(model, "base_model_prefix") else []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", "") or None
    groups: dict[str, _Group] = {}
    for file, key in keys:
        name, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if name not in expected and key in expected:  # a key already right must not be renamed away
            name, pattern = key, None
        if name not in expected:
            ignored.append(key)
            continue
        group = groups.get(name)
        if group is None:
            converter = None
            if pattern is not None:
                converter = copy.deepcopy(next(c for c in converters if pattern in c.source_patterns))
            group = groups[name] = _Group(name, [], converter)
        elif group.converter is None or pattern is None:
            raise ValueError(f"{file}: checkpoint tensors {group.sources[0][1]!r} and {key!r} both load into "
                             f"{name!r}")
        group.sources.append((file, key))
        if pattern is not None:
            group.patterns[key] = pattern
    for group in groups.values():  # per-expert pieces in expert order, as transformers stacks them
        group.sources.sort(key=lambda fk: dot_natural_key(fk[1]))
    return list(groups.values())


class _FreedMemory:
    """Reads checkpoint tensors, and hands memory the loader freed back to the system every `every` bytes.

    Each dense tensor read and freed is a heap block glibc keeps for reuse; with blocks of many sizes,
    the heap grows far past what is alive (a 1.5 GB bf16 checkpoint left 1.35 GiB of RSS for a 0.57 GiB
    quantized model). allocator.trim returns the free pages; elsewhere (no glibc) this does nothing.
    """

    def __init__(self, every: int = 64 * 2**20):
        self.every, self.pending = every, 0

    def read(self, handles: dict, file: Path, key: str) -> torch.Tensor:
        tensor = _read(handles, file, key)
        self.pending += tensor.nbytes
        return tensor

    def step(self) -> None:
        """Between groups, when the last group's tensors are placed or freed."""
        if self.pending >= self.every:
            allocator.trim()
            self.pending = 0


def _read(handles: dict, file: Path, key: str) -> torch.Tensor:
    try:
        return handles[file].get_tensor(key)
    except Exception as e:
        raise ValueError(f"{file}: tensor {key!r} cannot be read, the file may be truncated ({one_line(e)})") from None


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


@contextlib.contextmanager
def _open_files(files: Iterable[Path]) -> Iterator[dict]:
    """safetensors handles by file, closed (unmapped) at the end of the block; a one-line error for a bad file."""
    with contextlib.ExitStack() as stack:
        handles = {}
        for file in files:
            try:
                handles[file] = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            except Exception as e:
                raise ValueError(f"{file}: not a readable safetensors file ({one_line(e)})") from None
        yield handles


class _StreamingFill:
    """Fill a meta skeleton from safetensors files, one tensor at a time."""

    def __init__(self, model: nn.Module, targets: set[str], cfg: QuantConfig, device: torch.device,
                 skip_experts: set[str] = frozenset()):
        self.model, self.targets, self.cfg, self.device = model, targets, cfg, device
        self.experts = expert_parameters(model)  # 3-D expert stacks: quantized per expert
        self.skip_experts = skip_experts
        self.unquantized = dataclasses.replace(cfg, quant="none")
        self.expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.pending_bias: dict[str, torch.Tensor] = {}  # target layer -> bias that arrived before its weight
        self.done: set[str] = set()
        self.ignored: list[str] = []

    def run(self, files: list[Path]) -> None:
        with _open_files(files) as handles:
            keys = [(file, key) for file, h in handles.items() for key in h.keys()]
            self.fill(_plan_groups(self.model, keys, self.expected, self.ignored), handles)
        self.finish()

    def fill(self, groups: list[_Group], handles: dict) -> None:
        """Read, convert and place the tensors of `groups` from the open files `handles`."""
        released = _FreedMemory()
        for group in groups:
            released.step()
            if group.converter is None:
                (file, key), = group.sources
                self.place(file, key, group.target, released.read(handles, file, key))
                continue
            self._check_complete(group)
            for file, key in group.sources:
                group.converter.add_tensor(group.target, key, group.patterns[key],
                                           released.read(handles, file, key))
            file, key = group.sources[0]
            try:
                converted = group.converter.convert(group.target, model=self.model, config=self.model.config)
            except Exception as e:
                raise ValueError(f"{file}: cannot convert {key!r} and {len(group.sources) - 1} other tensor(s) "
                                 f"into {group.target!r} as transformers does ({one_line(e)})") from None
            for name in list(converted):
                tensor = converted.pop(name)
                tensor = tensor[0] if isinstance(tensor, list) else tensor
                if name not in self.expected:
                    self.ignored.append(name)
                    continue
                self.place(file, f"{name} (from {key!r} ...)", name, tensor)
                del tensor

    def _check_complete(self, group: _Group) -> None:
        """A stack of per-expert tensors must hold every expert the config asks for."""
        want = self.expected.get(group.target)
        if want is None or want.ndim != 3:
            return
        per_pattern: dict[str, list[str]] = {}
        for _, key in group.sources:
            per_pattern.setdefault(group.patterns[key], []).append(key)
        folder = group.sources[0][0].parent
        for pattern, keys in per_pattern.items():
            if "*" in pattern and len(keys) != want.shape[0]:
                # transformers' patterns are regexes in which "*." stands for one module index
                index = re.compile(pattern.replace("*.", r"(\d+)\."))
                found = {int(m.group(1)) for k in keys if (m := index.search(k))}
                lost = sorted(set(range(want.shape[0])) - found)
                which = (f"expert(s) {', '.join(map(str, lost[:8]))} missing" if lost and len(keys) < want.shape[0]
                         else "more tensors than experts")
                raise ValueError(f"{folder}: checkpoint has {len(keys)} tensors {pattern!r} for the {want.shape[0]} "
                                 f"experts of {group.target!r}: {which}")

    def place(self, file: Path, key: str, name: str, tensor: torch.Tensor) -> None:
        want = tuple(self.expected[name].shape)
        if tuple(tensor.shape) != want:
            raise ValueError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)} but the model's config "
                             f"expects {want}")
        module_name, _, leaf = name.rpartition(".")
        if name in self.experts:
            if not tensor.is_floating_point():
                raise ValueError(f"{file}: tensor {key!r} is {tensor.dtype}, expected floating-point weights")
            transposed, whole, order = self.experts[name]
            cfg = self.unquantized if name in self.skip_experts else self.cfg
            try:
                stack = ExpertStack.from_dense(tensor.to(self.device), cfg, transposed, leaf, whole, order)
            except ValueError as e:
                raise ValueError(f"{file}: tensor {key!r}: {e}") from None
            place_stack(self.model, name, stack.to(self.device))
        elif module_name in self.targets and leaf in ("weight", "bias"):
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

    def finish_ties(self) -> None:
        """Tie the output head to the embeddings (and other ties transformers makes), as transformers does."""
        model = self.model
        head, embed = output_head(model), model.get_input_embeddings()
        text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if head is not None and getattr(text_cfg, "tie_word_embeddings", False):
            if head.weight.is_meta or torch.equal(head.weight, embed.weight):
                head.weight = embed.weight  # tied: one tensor, two uses, as transformers does
            else:
                warnings.warn("config.json ties the output head to the embeddings, but the checkpoint has its own "
                              "different head weights: keeping them (untied), as transformers does", stacklevel=3)
        for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
            # other ties transformers makes (e.g. an output bias shared with the head): one tensor, two names
            owner_name, _, leaf = target.rpartition(".")
            try:
                owner, tied = model.get_submodule(owner_name), model.get_parameter(source)
            except AttributeError:
                continue
            current = owner._parameters.get(leaf)
            if current is not None and current.is_meta and not tied.is_meta:
                owner._parameters[leaf] = tied

    def finish(self) -> None:
        self.finish_ties()
        model = self.model
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


class CheckpointBlocks:
    """A checkpoint read a part at a time into a skeleton: the tensors outside the decoder blocks, then one
    block, quantized on arrival as load_quantized does. What is not read stays on the meta device, and a
    part can be dropped back to it, so a pass over the model holds about one block.

    Files are opened for each part and closed after it: pages of a memory-mapped file count towards the
    process's resident memory for as long as it stays mapped.
    """

    def __init__(self, path: Path, cfg: QuantConfig, device: str | torch.device = "cpu"):
        self.files = checkpoint_files(path)
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises several types for a bad config
            raise ValueError(f"{path / 'config.json'}: cannot read model config ({one_line(e)})") from None
        self.cfg, self.device = cfg, check_device(device)
        self.model = _skeleton(config, cfg)
        self.targets = set(linear_names(self.model, self.device))
        self._fill = _StreamingFill(self.model, self.targets, cfg, self.device)
        keys = []
        for file in self.files:
            with _open_files([file]) as handles:
                keys += [(file, key) for key in handles[file].keys()]
        self.layers_name, self.layers = decoder_layers(self.model)
        groups = _plan_groups(self.model, keys, self._fill.expected, self._fill.ignored)
        index = re.compile(rf"^{re.escape(self.layers_name)}\.(\d+)\.")
        self.groups: dict[int | None, list[_Group]] = {}
        for group in groups:
            m = index.match(group.target)
            self.groups.setdefault(int(m.group(1)) if m else None, []).append(group)
        self.templates = {}  # the meta modules a loaded part replaced, to drop it back

    def load(self, block: int | None, skip: Iterable[str] = ()) -> nn.Module:
        """Read decoder block `block` (or, for None, everything outside the blocks but the tensors named in
        `skip`); returns the block (or the model)."""
        skip = set(skip)
        groups = [g for g in self.groups.get(block, []) if g.target not in skip]
        if block is not None:
            self.templates[block] = copy.deepcopy(self.layers[block])
        with _open_files(dict.fromkeys(f for g in groups for f, _ in g.sources)) as handles:
            self._fill.fill(groups, handles)
        module = self.model if block is None else self.layers[block]
        prefix = "" if block is None else f"{self.layers_name}.{block}."
        if block is None:
            self._fill.finish_ties()
        missing = [n for n, t in [*module.named_parameters(remove_duplicate=False),
                                  *module.named_buffers(remove_duplicate=False)]
                   if t.is_meta and n not in skip and (block is not None or not n.startswith(self.layers_name + "."))]
        if missing or self._fill.pending_bias:
            what = f"{prefix}{missing[0]}" if missing else f"{next(iter(self._fill.pending_bias))}.bias"
            raise ValueError(f"checkpoint is missing tensor {what!r} ({len(missing) or 1} in this part); "
                             "is the folder complete and its config.json the right one?")
        return module

    def untied_ends(self) -> tuple[str, str] | None:
        """(input embedding, output head) weight names when both are their own checkpoint tensors: the start of
        a pass needs only the first, the end only the second."""
        head = output_head(self.model)
        embed = self.model.get_input_embeddings()
        names = {id(m): n for n, m in self.model.named_modules()}
        if head is None or embed is None or id(head) not in names or id(embed) not in names:
            return None
        pair = f"{names[id(embed)]}.weight", f"{names[id(head)]}.weight"
        targets = {g.target for g in self.groups.get(None, [])}
        return pair if pair[0] in targets and pair[1] in targets else None

    def drop(self, block: int | None) -> None:
        """Put a loaded part back on the meta device (its memory is freed when nothing else holds it)."""
        if block is not None:
            self.layers[block] = self.templates.pop(block)
            return
        for name, p in list(self.model.named_parameters(remove_duplicate=False)):  # buffers are small: kept
            if not name.startswith(self.layers_name + ".") and not p.is_meta:
                owner_name, _, leaf = name.rpartition(".")
                owner = self.model.get_submodule(owner_name) if owner_name else self.model
                owner._parameters[leaf] = nn.Parameter(p.to("meta"), requires_grad=False)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of decoder blocks (name, module): its ModuleList of num_hidden_layers entries."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not isinstance(module, ExpertStack) and len(module) == n:
            return name, module
    raise ValueError(f"{type(model).__name__}: cannot find its list of {n} decoder blocks")
