"""CPU 4-bit decode: the package's exact decode against bitsandbytes' CPU kernels, side by side in one run.

For each weight shape and block size it reports
  * whether bitsandbytes' CPU `dequantize_4bit` equals the format's decode (tests/reference.py), and its
    largest absolute error if not (on AVX512 CPUs a block that spans two rows is decoded with a wrong
    scale);
  * the median time of `qlora_kit.formats.dequantize` and of bitsandbytes' kernel, and their ratio;
  * the relative output error of a bitsandbytes `Linear4bit` on its repacked bf16 path (the one it takes on
    AVX512-BF16 CPUs at a no-grad evaluation), against the exact path;
and then, for a small random Llama loaded by transformers + bitsandbytes (nf4, double quantization), the
relative logit error of the repacked path against the exact one.

    .venv/bin/python benchmarks/bench_cpu_decode.py                       # defaults below, about 30 s
    .venv/bin/python benchmarks/bench_cpu_decode.py --shapes 4096x4096 --blocksizes 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import machine  # noqa: E402
from qlora_kit import formats  # noqa: E402
from qlora_kit.config import QuantConfig  # noqa: E402
from tests import reference  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def repacked_error(packed: dict, shape, blocksize: int) -> float | None:
    """Relative error of bitsandbytes' repacked bf16 path against its exact path, for one layer, or None where
    this CPU lacks the kernel (bitsandbytes registers it only on AVX512-BF16 CPUs)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16() or shape[1] % blocksize or shape[0] % 32:
        return None
    stats = {k.removeprefix("weight."): v for k, v in
             formats.bnb_checkpoint_tensors(packed, "nf4", shape, blocksize, torch.float32).items() if k != "weight"}
    outs = []
    for repack in (False, True):
        layer = bnb.nn.Linear4bit(shape[1], shape[0], bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit.from_prequantized(packed["weight"].clone(), dict(stats), device="cpu",
                                                           module=layer)
        layer.support_avx512bf16_for_cpu = repack
        x = torch.randn(16, shape[1], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            outs.append(layer.eval()(x).double())
    return ((outs[1] - outs[0]).norm() / outs[0].norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="96x320,1536x576,576x1536,4096x4096", help="out x in, comma-separated")
    ap.add_argument("--blocksizes", default="64,128,256")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    import bitsandbytes
    import bitsandbytes.functional as bnbF
    from bitsandbytes.functional import has_avx512bf16

    flags = f"avx512bf16={has_avx512bf16()}, torch cpu capability {torch.backends.cpu.get_cpu_capability()}"
    print(f"{machine(torch.device('cpu'))}\n{flags}; torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}")
    print(f"{'shape':>10} {'block':>5} {'dq':>3} {'bnb == decode':>13} {'bnb max err':>11} {'ours ms':>8} "
          f"{'bnb ms':>8} {'ours/bnb':>8} {'repacked rel err':>16}")
    for spec in args.shapes.split(","):
        shape = tuple(int(v) for v in spec.split("x"))
        w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
        for blocksize in (int(b) for b in args.blocksizes.split(",")):
            for dq in (False, True):
                packed = formats.quantize(w, QuantConfig(quant="nf4", blocksize=blocksize, double_quant=dq))
                ref = reference.decode_4bit(packed, "nf4", shape, blocksize)
                state = formats._quant_state(packed, "nf4", shape, blocksize, torch.float32)
                theirs = bnbF.dequantize_4bit(packed["weight"], state)
                ours_ms = median_ms(lambda p=packed, s=shape, b=blocksize: formats.dequantize(p, "nf4", s, b, torch.float32),
                                    args.repeats)
                bnb_ms = median_ms(lambda p=packed, st=state: bnbF.dequantize_4bit(p["weight"], st), args.repeats)
                rep = repacked_error(packed, shape, blocksize)
                print(f"{spec:>10} {blocksize:>5} {'yes' if dq else 'no':>3} {str(torch.equal(theirs, ref)):>13} "
                      f"{(theirs - ref).abs().max().item():>11.3g} {ours_ms:>8.2f} {bnb_ms:>8.2f} "
                      f"{ours_ms / bnb_ms:>8.2f} {'n/a' if rep is None else f'{rep:.2e}':>16}")


def model_repacked_error() -> float | None:
    """Relative logit error of transformers + bitsandbytes on the repacked path against the exact path, for a
    small random Llama (hidden 256, 2 layers), or None where this CPU lacks the kernel."""
    import tempfile

    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    if not has_avx512bf16():
        return None
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    logits = []
    with tempfile.TemporaryDirectory() as folder:
        AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
        for repack in (False, True):
            model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu",
                                                         dtype=torch.float32).eval()
            for m in model.modules():
                if isinstance(m, bnb.nn.Linear4bit):
                    m.support_avx512bf16_for_cpu = repack
            with torch.no_grad():
                logits.append(model(ids).logits.double())
    return ((logits[1] - logits[0]).norm() / logits[0].norm()).item()


if __name__ == "__main__":
    main()
    err = model_repacked_error()
    print("small Llama (hidden 256, nf4 + double quant, 2 x 64 tokens) through transformers + bitsandbytes: "
          + ("repacked path n/a on this CPU" if err is None else f"repacked vs exact logits, relative error {err:.2e}"))
