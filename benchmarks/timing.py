"""Shared helpers for the benchmarks: event timing, CUDA-graph timing, the card, floors, charts.

Timing rules (see ../.library/device/METHOD.md):
- eager: one pair of CUDA events around every call, one synchronize at the end, median;
- graph: capture ``calls_per_graph`` calls in one CUDA graph (after a warm-up on the
  capturing side stream, so lazy setup and per-stream workspaces stay out of capture),
  time each replay with events, median / ``calls_per_graph``;
- inputs of small problems rotate over several sets (``Rotation``) so repeated calls do
  not just measure the L2 cache.
Without CUDA (``--dry-run`` on a CPU machine) ``time_eager`` falls back to a host clock so
that every non-CUDA code path can be exercised; ``time_graph`` then returns None.
``GpuMonitor`` samples the SM clock, power draw and clock-limit reasons through NVML during a
measurement, so that a slow number can be told apart from a card running at lower clocks.
"""
from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Optional, Sequence

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense fp16/bf16 matrix rate used for the arithmetic floor (measured, see KERNELS.md).
MATMUL_FLOPS = 790e12
# HBM bandwidth by card (bytes/s); the first key found in the card name wins.
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}
DEFAULT_HBM = 3.35e12
DEFAULT_L2_BYTES = 50 * 2**20


def add_repo_to_path() -> None:
    """Make ``import deepspeed_diffusers_attn`` find the repository's package."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)


# ---------------------------------------------------------------------- timing
def _sync(device_is_cuda: bool) -> None:
    if device_is_cuda:
        torch.cuda.synchronize()


def time_eager(
    fn: Callable[[], object],
    warmup: int = 10,
    iters: int = 100,
    budget_ms: Optional[float] = None,
    min_iters: int = 3,
    use_cuda: Optional[bool] = None,
) -> float:
    """Median milliseconds per call of ``fn`` run back to back (eager launches).

    The first warm-up call is timed on its own (synchronised) to estimate the cost; when
    ``budget_ms`` is given, warm-up and timed iterations are cut so that the whole
    measurement takes roughly that long (at least ``min_iters`` timed calls).
    ``use_cuda`` (default: CUDA is available) picks CUDA events or the host clock.
    """
    cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    fn()  # first call: lazy setup, not representative
    _sync(cuda)
    t1 = time.perf_counter()
    fn()
    _sync(cuda)
    est_ms = (time.perf_counter() - t1) * 1e3
    if budget_ms is not None and est_ms > 0:
        fit = int(budget_ms / est_ms)
        iters = max(min_iters, min(iters, fit * 3 // 4))
        warmup = max(0, min(warmup, fit // 4))
    for _ in range(warmup):
        fn()
    if not cuda:
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def time_graph(
    fn: Callable[[], object],
    calls_per_graph: int = 20,
    replays: int = 20,
    warmup: int = 3,
    budget_ms: Optional[float] = None,
    use_cuda: Optional[bool] = None,
) -> Optional[float]:
    """Median milliseconds per call of ``fn`` under CUDA-graph replay, or None without CUDA.

    ``fn`` is warmed up on a side stream, then ``calls_per_graph`` calls are captured in
    one graph on that same stream (per-stream state such as our workspace exists by
    then). Each replay is timed with events; the median is divided by ``calls_per_graph``.
    When ``budget_ms`` is given and the calls are slow, fewer calls per graph and fewer
    replays are used (at least 1 call and 3 replays): launch overhead, which graphs remove,
    only matters for short calls anyway.
    Exceptions from capture propagate (the caller reports them).
    """
    if not (torch.cuda.is_available() if use_cuda is None else use_cuda):
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est_ms = (time.perf_counter() - t) * 1e3
    torch.cuda.current_stream().wait_stream(stream)
    if budget_ms is not None and est_ms * calls_per_graph * replays > budget_ms:
        calls_per_graph = max(1, min(calls_per_graph, int(budget_ms / (3 * est_ms))))
        replays = max(3, min(replays, int(budget_ms / (est_ms * calls_per_graph))))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(calls_per_graph):
            fn()
    torch.cuda.synchronize()
    graph.replay()  # first replay uploads the graph
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for s, e in zip(starts, ends):
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    ms = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / calls_per_graph
    del graph
    return ms


class Rotation:
    """Cycle through several input sets: ``rot.next()`` returns the next set.

    ``make(i)`` builds set ``i``. The number of sets is chosen so that all of them together
    exceed ``factor`` x the L2 cache (at least 1, at most ``max_sets``), given the bytes one
    set moves.
    """

    def __init__(self, make: Callable[[int], object], bytes_per_set: int, factor: float = 3.0,
                 max_sets: int = 16, l2_bytes: Optional[int] = None):
        l2 = l2_bytes if l2_bytes is not None else l2_cache_bytes()
        self.n = max(1, min(max_sets, math.ceil(factor * l2 / max(1, bytes_per_set))))
        self.sets = [make(i) for i in range(self.n)]
        self._i = 0

    def next(self):
        s = self.sets[self._i]
        self._i = (self._i + 1) % self.n
        return s


def l2_cache_bytes() -> int:
    """The L2 size of the current CUDA device (50 MiB, an H100's, if unknown or no CUDA)."""
    if torch.cuda.is_available():
        size = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
        if size:
            return int(size)
    return DEFAULT_L2_BYTES


# ---------------------------------------------------------------------- clocks and power
# NVML's clock-event ("throttle") reason bits: nvmlClocksEventReason* in nvml.h.
CLOCK_REASONS = {0x1: "idle", 0x2: "app_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
                 0x10: "sync_boost", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake",
                 0x100: "display_clocks"}


_NVML_HANDLES: dict = {}


def _nvml_handle():
    """(pynvml, handle) for the current CUDA device, or None without CUDA or NVML.

    The handle is the one ``torch.cuda.clock_rate`` reads (torch maps its device index to
    NVML's, CUDA_VISIBLE_DEVICES included); pynvml comes from the nvidia-ml-py package.
    Looked up once per device."""
    if not torch.cuda.is_available():
        return None
    dev = torch.cuda.current_device()
    if dev not in _NVML_HANDLES:
        try:
            import pynvml

            handle = torch.cuda._get_pynvml_handler(dev)
            pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
            _NVML_HANDLES[dev] = (pynvml, handle)
        except Exception:  # no pynvml, no NVML in this container, or an older torch
            _NVML_HANDLES[dev] = None
    return _NVML_HANDLES[dev]


def nvml_limits() -> dict:
    """The card's maximum SM clock (MHz) and enforced power limit (W); empty without NVML."""
    nv = _nvml_handle()
    if nv is None:
        return {}
    pynvml, handle = nv
    out = {}
    for key, read in (("sm_max_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)),
                      ("power_limit_w", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0)):
        try:
            out[key] = read()
        except Exception:
            pass
    return out


class GpuMonitor:
    """Samples the current GPU's SM clock (MHz), power draw (W) and active clock-limit
    reasons through NVML while its ``with`` block runs: every ``interval`` seconds on a
    daemon thread, and once right at the end of the block (a timed block has synchronised
    by then, so that sample is taken under load). ``summary()`` is a dict, or None without
    CUDA or NVML; nothing here raises.

    NVML's power reading is an average over its own sample period (1/6 to 1 s by product):
    blocks shorter than that mix in what ran before them (--budget-ms 1000 avoids it). Each
    sample is a few NVML calls on the thread, well under a millisecond per ``interval``.
    """

    def __init__(self, enabled: bool = True, interval: float = 0.05):
        self.interval = interval
        self.samples: list = []
        self._nv = _nvml_handle() if enabled else None
        self._stop = threading.Event()
        self._thread = None

    def _sample(self) -> None:
        pynvml, handle = self._nv
        try:
            mhz = pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
        except Exception:
            return
        try:
            watts = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
        except Exception:  # some virtualised GPUs report clocks but not power
            watts = None
        bits = None
        for fn in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
            if hasattr(pynvml, fn):
                try:
                    bits = int(getattr(pynvml, fn)(handle))
                except Exception:
                    pass
                break
        self.samples.append((mhz, watts, bits))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        if self._nv is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        if self._nv is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
        return False

    def summary(self) -> Optional[dict]:
        """SM MHz (min / median / max), W (median / max), the reasons seen in any sample
        (bits decoded with CLOCK_REASONS), the number of samples and the last sample."""
        if not self.samples:
            return None
        mhz = [s[0] for s in self.samples]
        watts = [s[1] for s in self.samples if s[1] is not None]
        seen = 0
        for s in self.samples:
            seen |= s[2] or 0
        last = self.samples[-1]
        return {
            "samples": len(self.samples),
            "sm_mhz_min": min(mhz), "sm_mhz_median": statistics.median(mhz), "sm_mhz_max": max(mhz),
            "power_w_median": statistics.median(watts) if watts else None,
            "power_w_max": max(watts) if watts else None,
            "reasons": [name for bit, name in CLOCK_REASONS.items() if seen & bit],
            "reason_bits": seen if any(s[2] is not None for s in self.samples) else None,
            "last": {"sm_mhz": last[0], "power_w": last[1]},
        }


def gpu_text(g: Optional[dict]) -> str:
    """One short cell for a GpuMonitor summary: median SM MHz, median W, limit reasons."""
    if not g:
        return ""
    reasons = [r for r in g["reasons"] if r != "idle"]
    watts = "" if g["power_w_median"] is None else f" {g['power_w_median']:.0f} W"
    return (f"{g['sm_mhz_median']:.0f} MHz (min {g['sm_mhz_min']}){watts}"
            + (f" [{','.join(reasons)}]" if reasons else ""))


# ---------------------------------------------------------------------- the card
def _nvidia_smi_driver() -> Optional[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        line = out.stdout.strip().splitlines()
        return line[0].strip() if out.returncode == 0 and line else None
    except (OSError, subprocess.SubprocessError):
        return None


def card_info() -> dict:
    """The GPU and software versions, as a flat dict (``name`` is "cpu" without CUDA)."""
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": sys.version.split()[0],
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    if not torch.cuda.is_available():
        info.update(name="cpu", sm_count=None, capability=None, driver=None, l2_bytes=None, mem_gib=None)
        return info
    dev = torch.cuda.current_device()
    p = torch.cuda.get_device_properties(dev)
    info.update(
        name=p.name,
        sm_count=p.multi_processor_count,
        capability=f"{p.major}.{p.minor}",
        mem_gib=round(p.total_memory / 2**30, 1),
        l2_bytes=getattr(p, "L2_cache_size", None),
        driver=_nvidia_smi_driver(),
    )
    info.update(nvml_limits())
    return info


def card_line(info: dict) -> str:
    """One line for logs."""
    limits = "".join(f", {label} {info[key]:.0f} {unit}" for key, label, unit in (
        ("sm_max_mhz", "SM max", "MHz"), ("power_limit_w", "power limit", "W")) if info.get(key) is not None)
    return (
        f"card: {info['name']} (sm {info.get('capability')}, {info.get('sm_count')} SMs, "
        f"{info.get('mem_gib')} GiB, driver {info.get('driver')}{limits}) | torch {info['torch']} "
        f"CUDA {info['cuda']} cuDNN {info['cudnn']} | python {info['python']} "
        f"diffusers {info.get('diffusers')}"
    )


def hbm_bytes_per_s(card) -> float:
    """HBM bandwidth for a card name (or card_info dict): H200 4.8 TB/s, else H100's 3.35."""
    name = card["name"] if isinstance(card, dict) else str(card)
    for key, bw in HBM_BYTES_PER_S.items():
        if key.lower() in name.lower():
            return bw
    return DEFAULT_HBM


def floors(flops: float, nbytes: float, card) -> dict:
    """The two floors (µs) and the binding one: arithmetic at 790 TFLOP/s, bytes at HBM rate."""
    arith_us = flops / MATMUL_FLOPS * 1e6
    bytes_us = nbytes / hbm_bytes_per_s(card) * 1e6
    return {
        "arith_us": arith_us,
        "bytes_us": bytes_us,
        "floor_us": max(arith_us, bytes_us),
        "bound": "compute" if arith_us >= bytes_us else "bytes",
    }


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf if out has NaN/Inf)."""
    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return float("inf")
    return float((o - r).norm() / r.norm().clamp_min(1e-300))


def short_error(e: BaseException, limit: int = 90) -> str:
    """The first line of an exception message, shortened for a table cell."""
    msg = str(e).strip().splitlines()
    msg = msg[0] if msg else type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# ---------------------------------------------------------------------- charts
def bar_chart(path: str, title: str, groups: Sequence[str], series: dict, ylabel: str) -> str:
    """Grouped bars: ``series[name]`` is a list of values (None = missing) per group.

    Uses matplotlib when importable, else draws with PIL. Returns a short status string.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is not None:
        n = len(series)
        width = 0.8 / max(1, n)
        fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(groups) + 2), 5))
        for j, (name, vals) in enumerate(series.items()):
            xs = [i + (j - (n - 1) / 2) * width for i in range(len(groups))]
            ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=name)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return f"wrote {path} (matplotlib)"
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return "no chart: neither matplotlib nor PIL is importable"
    _pil_bars(Image, ImageDraw, path, title, groups, series, ylabel)
    return f"wrote {path} (PIL)"


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194)]


def _pil_bars(Image, ImageDraw, path, title, groups, series, ylabel) -> None:
    W, H, left, top, bottom = max(900, 110 * len(groups) + 120), 520, 70, 50, 130
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    vmax = max([v for vals in series.values() for v in vals if v is not None] + [1e-9])
    plot_h, plot_w = H - top - bottom, W - left - 20
    d.text((left, 10), title[:140], fill="black")
    d.text((5, top - 20), ylabel, fill="black")
    d.line([(left, top), (left, top + plot_h), (left + plot_w, top + plot_h)], fill="black")
    for k in range(5):
        y = top + plot_h - plot_h * k / 4
        d.text((5, y - 6), f"{vmax * k / 4:.3g}", fill="black")
    n = len(series)
    gw = plot_w / max(1, len(groups))
    bw = 0.8 * gw / max(1, n)
    for i, g in enumerate(groups):
        x0 = left + i * gw + 0.1 * gw
        for j, vals in enumerate(series.values()):
            v = vals[i]
            if v is None:
                continue
            h = plot_h * v / vmax
            d.rectangle([x0 + j * bw, top + plot_h - h, x0 + (j + 1) * bw - 1, top + plot_h],
                        fill=_COLORS[j % len(_COLORS)])
        d.text((x0, top + plot_h + 5 + 12 * (i % 2)), g[:18], fill="black")
    for j, name in enumerate(series):
        y = H - bottom + 45 + 14 * j
        d.rectangle([left, y, left + 10, y + 10], fill=_COLORS[j % len(_COLORS)])
        d.text((left + 15, y - 1), name, fill="black")
    img.save(path)


def fmt(x: Optional[float], spec: str = ".1f", none: str = "-") -> str:
    """Format a number, or ``none`` for None."""
    return none if x is None else format(x, spec)


def setup(script: str, args) -> tuple:
    """The common start of a benchmark's main: device, dtype and card, printed.

    Exits with a clear message without CUDA unless ``args.dry_run`` (tiny CPU shapes in
    float32, to check the script); turns TF32 off so float32 references are true float32.
    The dtype is ``args.dtype`` ("fp16" / "bf16"), float32 in a dry run, and None when
    ``args.dtype`` is None (the script then picks one per case).
    """
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        sys.exit(f"{script}: no CUDA device; use --dry-run to check the script on a CPU")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float32 if args.dry_run else {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    card = card_info()
    if args.dry_run:
        card["name"] = "cpu (dry-run)"
    print(card_line(card))
    return device, dtype, card


def run_all(items, bench_one, show) -> list:
    """``bench_one(item)`` for every item under inference mode, ``show``-ing each result as
    it comes (long runs print progress); prints the total time; returns the results."""
    t0 = time.time()
    results = []
    with torch.inference_mode():
        for item in items:
            res = bench_one(item)
            show(res)
            results.append(res)
    print(f"\n(total {time.time() - t0:.0f} s)")
    return results

