"""Training memory: estimate it from config.json alone, measure it on real steps, fit a budget, sweep.

The estimate and the measurement's breakdown count the same thing, the bytes of every tensor storage alive,
with `LiveTensors` (a dispatch mode that sees every tensor an operator returns and a weak reference
that sees it freed), split into the categories of `CATEGORIES`:

  * static: quantized weights (codes + absmax + double-quantization levels), weights left unquantized
    (embeddings, norms, output head, biases, rotary tables), LoRA parameters;
  * per step: LoRA gradients, optimizer state, activations (what the forward through the decoder keeps
    for backward, including the recomputation boundaries under checkpointing), logits & loss (what the
    fused loss of loss.py keeps: a chunk of fp32 logits and the last hidden state's gradient; or
    transformers' logits, fp32 upcast and log-softmax), backward temporaries (gradients in flight,
    recomputed activations under checkpointing, the weight dequantized for an input gradient) and
    optimizer temporaries.

The estimate builds the model from its config on the meta device (shapes and dtypes, no storage), gives
every linear layer the exact packed layout bitsandbytes would produce (`formats.packed_layout`), attaches LoRA,
and runs the training steps there: the same transformers forward, the same autograd graph, the same
optimizer code. What differs between a meta run and a real one is emulated in `emulation.TargetKernels`:
attention runs a flash-type kernel that keeps O(seq) per head (the CPU and CUDA kernels both do); on CUDA,
dropout keeps a 1-byte mask and bf16 autocast casts the fp32 LoRA matmuls to bf16 and upcasts norms and
softmax. On CUDA the estimate adds the cuBLAS workspaces, and paged optimizer state (CUDA managed memory,
outside torch's allocator) is left out of the total and named in a note. The peak is the largest live
total seen. The optimizer step is not run on the meta device: its state is allocated by formula and its
temporaries by a rule (`optimizer_step_temporaries`).

The measurement runs the same steps on real tensors (random weights: values do not change memory) and
reports the peak of the same count per category, beside what the machine saw (observed.ObservedPeak, which
shares no code with the count): the allocator's own peak, the measurement's total and the figure the
estimate is checked against (CUDA: torch.cuda.max_memory_allocated; CPU: torch's CPU allocator through the
profiler's memory events), and the process's peak RSS.

The package, by concern: counting.py (LiveTensors), observed.py (allocator and process peaks), formulas.py (optimizer state and step temporaries; the
packed layout is formats.packed_layout), models.py (config.json, the meta and random models), emulation.py
(what a meta run is told of the target's kernels), run.py (the counted steps), estimate.py (estimate and
measure), plan.py (fit a budget, sweep), report.py (text).
"""

from .counting import CATEGORIES, STATIC, LiveTensors
from .estimate import MEMORY_FIELDS, MemoryReport, check_measurable, estimate, measure
from .formulas import optimizer_state_bytes, optimizer_step_temporaries
from .models import meta_model, random_model, read_model_config
from .plan import FitResult, fit, parse_size, parse_sweep, sweep, write_csv, write_plot
from .report import format_fit, format_report
from .run import run_steps

__all__ = [
    "CATEGORIES", "STATIC", "LiveTensors", "MEMORY_FIELDS", "MemoryReport", "check_measurable", "estimate", "measure",
    "optimizer_state_bytes", "optimizer_step_temporaries", "meta_model", "random_model", "read_model_config",
    "FitResult", "fit", "parse_size", "parse_sweep", "sweep", "write_csv", "write_plot", "format_fit",
    "format_report", "run_steps",
]
