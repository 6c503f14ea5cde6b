"""Memory as the machine sees it: the allocator's own peak and the process's peak RSS.

This is the ground truth the live-tensor count (counting.LiveTensors) is checked against. It shares no code
with that count:

  * CUDA: torch.cuda.max_memory_allocated / max_memory_reserved (the caching allocator's own counters).
  * CPU: every block torch's CPU allocator hands out and takes back, as the profiler's memory recording
    reports it (c10's allocator, not the Python dispatcher: it also sees the buffers that aten kernels and
    bitsandbytes allocate inside an operator, which no dispatch mode sees). Recording starts before the model
    is built, so the weights are in it. Storage that torch's allocator did not allocate (a memory-mapped
    checkpoint, malloc inside a third-party library) is not.
  * Process: the peak resident set (VmHWM, reset where the measured window starts) and the resident set
    when recording started; their difference is what building the model and training added, as `top` shows
    it (allocator caching and fragmentation included).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading

import torch

_WINDOW = "qlora-kit: measured window"

# What the profiler itself prints to the terminal: kineto's start/stop markers; c10's note on blocks allocated
# before recording started (which the recording leaves out, as it should); its note on toggling op events,
# which concerns GPU traces.
_PROFILER_NOISE = re.compile(r"^(USDT:.*profiler_(start|stop)"
                             r"|\[W.*(CPUAllocator.*allocated before the profiling|Toggling CPU activity))")


def rss_now() -> int:
    """The process's resident set, in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _proc_kib(path: str, field: str) -> int | None:
    """A 'Field:  N kB' line of a /proc file, in bytes; None where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def system_available() -> int | None:
    """Memory the system can give this process without swapping (MemAvailable), in bytes; None if unknown."""
    return _proc_kib("/proc/meminfo", "MemAvailable:")


def rss_peak() -> int:
    """The process's peak resident set (VmHWM), in bytes (Linux /proc; 0 elsewhere)."""
    return _proc_kib("/proc/self/status", "VmHWM:") or 0


def reset_rss_peak() -> bool:
    """Set the kernel's peak-RSS mark (VmHWM, what ru_maxrss reports) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _quiet_profiler():
    """Run the block with fd 2 going through a filter that passes every line on as it comes, but the
    profiler's noise (Python's sys.stderr is flushed at both ends so that its lines keep their order)."""
    try:
        saved = os.dup(2)
        read_end, write_end = os.pipe()
    except OSError:
        yield
        return

    def forward() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not _PROFILER_NOISE.match(line.decode(errors="replace")):
                    view = memoryview(line)
                    while view:
                        view = view[os.write(saved, view):]

    thread = threading.Thread(target=forward, name="qlora-kit stderr filter", daemon=True)
    thread.start()
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer closes: the filter drains it and ends
        thread.join(timeout=10)
        os.close(saved)


class ObservedPeak:
    """The allocator's peak and the process's peak RSS over a window of training steps.

        obs = ObservedPeak(device); obs.start()       # before the model is built
        ... build, warm up ...;  obs.reset_peak()     # where the measured window starts
        ... measured steps ...;  obs.stop()           # then obs.allocated_peak, obs.reserved_peak, obs.rss_*

    allocated_peak: CUDA max_memory_allocated, or on CPU the peak of bytes torch's CPU allocator had handed
    out (from start(), so weights included) during the window. reserved_peak: CUDA max_memory_reserved
    (None on CPU, whose allocator caches nothing: freed blocks go back to malloc). rss_start / rss_peak:
    the process's resident set at start() and its peak during the window, read before the recording is
    turned into Python objects (a million allocation events would add hundreds of MB of them).
    """

    def __init__(self, device: str) -> None:
        self.cuda = str(device).startswith("cuda")
        self.device = torch.device(device)
        self.allocated_peak: int | None = None
        self.reserved_peak: int | None = None
        self.rss_start = 0
        self.rss_peak = 0
        self._prof = None
        self._quiet: contextlib.ExitStack | None = None
        self.unavailable: str | None = None
        self._rss_window = False

    def start(self) -> ObservedPeak:
        import gc

        from .. import allocator

        gc.collect()  # earlier work's garbage (mapped files included) is freed now, not inside the measured window
        allocator.trim()  # what earlier work in this process freed is not this run's
        self.rss_start = rss_now()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif torch.autograd.profiler._is_profiler_enabled:  # the user's own: leave it alone
            self.unavailable = "the allocator's view needs the profiler, and another one is running"
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._quiet = contextlib.ExitStack()
            self._quiet.enter_context(_quiet_profiler())  # until stop(): c10 notes frees of unrecorded blocks
            try:
                self._prof.start()
                self._ops(False)  # memory events only: a million op events would cost the process GBs
            except RuntimeError as e:  # another profiler is running: no allocator view, the RSS still
                self._quiet.close()
                self._prof, self.unavailable = None, f"the allocator's view needs the profiler ({e})"
            except BaseException:
                self._quiet.close()
                raise
        return self

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._prof is not None:  # a marker in the recording, on the profiler's own clock
            self._ops(True)
            with torch.profiler.record_function(_WINDOW):
                pass
            self._ops(False)
        self._rss_window = reset_rss_peak()

    def stop(self) -> ObservedPeak:
        # None where the kernel's peak mark could not be reset: its figure would be the whole process's life
        self.rss_peak = rss_peak() if self._rss_window else None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.allocated_peak = torch.cuda.max_memory_allocated(self.device)
            self.reserved_peak = torch.cuda.max_memory_reserved(self.device)
        elif self._prof is not None:
            prof, self._prof = self._prof, None
            self._stop_recording(prof)
            self.allocated_peak = _cpu_allocator_peak(prof)
        return self

    def abort(self) -> None:
        """Stop recording without reading it (the run failed)."""
        if self._prof is not None:
            prof, self._prof = self._prof, None
            self._stop_recording(prof)

    def _ops(self, on: bool) -> None:
        from torch.profiler import ProfilerActivity

        self._prof.toggle_collection_dynamic(on, [ProfilerActivity.CPU])

    def _stop_recording(self, prof) -> None:
        try:
            prof.stop()
        finally:
            self._quiet.close()


def _cpu_allocator_peak(prof) -> int:
    """The largest running total of the CPU allocator's [memory] events from the window's marker on (from the
    start where there is no marker).

    A free counts only against a block of its size allocated in this recording: c10 remembers the sizes of
    blocks recorded in an earlier recording, and reports their frees (or a reused address's) again.
    """
    cpu = torch._C._autograd.DeviceType.CPU
    window_ns = 0
    events = []
    for e in prof.profiler.kineto_results.events():
        if e.name() == "[memory]":
            if e.device_type() == cpu:
                events.append((e.start_ns(), e.nbytes()))
        elif e.name() == _WINDOW:
            window_ns = e.start_ns()
    events.sort(key=lambda e: e[0])  # stable: events of one instant keep the order they were recorded in
    outstanding: dict[int, int] = {}
    total = peak = 0
    started = False
    for t, n in events:
        if not started and t >= window_ns:
            started = True
            peak = total
        if n < 0:
            if outstanding.get(-n, 0) == 0:
                continue
            outstanding[-n] -= 1
        else:
            outstanding[n] = outstanding.get(n, 0) + 1
        total += n
        if started and total > peak:
            peak = total
    return peak if started else total
