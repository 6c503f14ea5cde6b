"""Shared by the benchmark scripts: a one-line description of the machine."""

from __future__ import annotations

import os
import platform

import torch


def machine(device: torch.device) -> str:
    """GPU name, or CPU model, cores, torch threads and the load average (a busy machine skews timings)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    load = ", load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{load}"
