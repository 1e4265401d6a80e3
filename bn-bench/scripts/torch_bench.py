#!/usr/bin/env python3
"""PyTorch's CPU batch norm on bn-bench's standard shapes or suites, timed the way bn-bench times ours.

Not part of the build or of CI: it needs PyTorch, which is large. Install it into a virtual
environment outside the repository and run it next to bn-bench on the same machine:

    python3 -m venv ~/torchenv && ~/torchenv/bin/pip install torch
    ~/torchenv/bin/python bn-bench/scripts/torch_bench.py            # all cases and modes
    ~/torchenv/bin/python bn-bench/scripts/torch_bench.py --case S1,S6 --json torch.json
    ~/torchenv/bin/python bn-bench/scripts/torch_bench.py --suite resnet50 --json torch-rn50.json
    ~/torchenv/bin/python bn-bench/scripts/torch_bench.py --shape 32x960x7x7 --json torch-custom.json

What is timed, per case and mode, interleaved repetition by repetition (as bn-bench does):
- train:    torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias,
            training=True) under torch.no_grad(): batch statistics, running statistics, y;
- eval:     the same with training=False;
- backward: torch.ops.aten.native_batch_norm_backward with the saved mean and inverse std of a
            training forward: dx, dgamma, dbeta (the kernel autograd calls, without autograd);
- copy:     dst.copy_(src) moving the bytes the mode must move (2x the tensor forward, 3x
            backward), the same yardstick as bn-bench's `x copy` column.
S3 is NHWC: x is (32, 64, 56, 56) in torch.channels_last. --shape times one other shape instead,
as bn-bench's --shape does (case "custom"; the layout from the rank, or --layout). --suite
resnet50 runs the batch-norm layers of ResNet-50 at batch 50 instead (NCHW, bn-bench's R1..R9 with
their counts in the network) and prints the time of one training step (forward + backward of the
53 layers) and of one inference pass, the summary bn-bench prints for its own suite run. Calls
under 10 us are timed in batches of consecutive calls, each batch counted as its mean (warm calls,
as bn-bench times S6).
--json writes bn-bench's records (a JSON array) (implementation "pytorch", and "copy" for the
yardstick), with this command and the CPU's model name, for `bn-bench markdown --torch` and
`bn-bench --suite resnet50 --torch`.
"""

import argparse
import json
import random
import shlex
import sys
import time

import torch
import torch.nn.functional as F

# name: (shape, layout, channels): bn-bench's standard shapes. NHWC is given in NCHW order and
# stored channels-last, as PyTorch holds NHWC tensors.
CASES = {
    "S1": ((256, 1024), "NC", 1024),
    "S2": ((32, 64, 56, 56), "NCHW", 64),
    "S3": ((32, 64, 56, 56), "NHWC", 64),
    "S4": ((32, 2048, 7, 7), "NCHW", 2048),
    "S5": ((64, 128, 1000), "NCL", 128),
    "S6": ((1, 64, 8, 8), "NCHW", 64),
}
# bn-bench's axes and shape as it prints them (NHWC in its own order).
BENCH_SHAPES = {
    "S1": ([256, 1024], [0]),
    "S2": ([32, 64, 56, 56], [0, 2, 3]),
    "S3": ([32, 56, 56, 64], [0, 1, 2]),
    "S4": ([32, 2048, 7, 7], [0, 2, 3]),
    "S5": ([64, 128, 1000], [0, 2]),
    "S6": ([1, 64, 8, 8], [0, 2, 3]),
}
# The batch-norm layers of ResNet-50 at batch 50 (oneDNN benchdnn inputs/bnorm/bnorm_resnet_50):
# name: (NCHW shape, how many layers of the network have it), as bn-bench's --suite resnet50.
RESNET50 = {
    "R1": ((50, 64, 112, 112), 1),
    "R2": ((50, 256, 56, 56), 4),
    "R3": ((50, 64, 56, 56), 6),
    "R4": ((50, 512, 28, 28), 5),
    "R5": ((50, 128, 28, 28), 8),
    "R6": ((50, 1024, 14, 14), 7),
    "R7": ((50, 256, 14, 14), 12),
    "R8": ((50, 2048, 7, 7), 4),
    "R9": ((50, 512, 7, 7), 6),
}
for _name, (_shape, _count) in RESNET50.items():
    CASES[_name] = (_shape, "NCHW", _shape[1])
    BENCH_SHAPES[_name] = (list(_shape), [0, 2, 3])
SUITES = {"resnet50": ("ResNet-50", RESNET50)}
MODES = ("train", "eval", "backward")
# --layout: bn-bench's reduced axes, and the rank each takes (the default by rank as in bn-bench).
LAYOUTS = {"nc": ([0], 2), "ncl": ([0, 2], 3), "nchw": ([0, 2, 3], 4), "nhwc": ([0, 1, 2], 4)}
MIN_SAMPLE_S = 10e-6
EPS = 1e-5


def make_case(name):
    shape, layout, c = CASES[name]
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=gen) * 2.0 - 0.5
    dy = torch.rand(shape, generator=gen) * 2.0 - 1.0
    if layout == "NHWC":
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    weight = 1.0 + 0.25 * (torch.arange(c) % 7).float() / 7.0
    bias = 0.1 * ((torch.arange(c) % 5).float() - 2.0)
    return x, dy, weight, bias


def jobs_for(name, mode):
    x, dy, weight, bias = make_case(name)
    c = weight.numel()
    running_mean, running_var = torch.zeros(c), torch.ones(c)
    n = x.numel()

    def train():
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, EPS)

    def evaluate():
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.1, EPS)

    _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
        x, weight, bias, running_mean.clone(), running_var.clone(), True, 0.1, EPS
    )

    def backward():
        return torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, running_mean, running_var, save_mean, save_invstd, True, EPS,
            [True, True, True],
        )

    copy_len = n * (3 if mode == "backward" else 2) // 2
    src = torch.rand(copy_len)
    dst = torch.empty(copy_len)

    def copy():
        dst.copy_(src)

    layer = {"train": train, "eval": evaluate, "backward": backward}[mode]
    return {"pytorch": layer, "copy": copy}, n


def measure(jobs, budget_s, min_reps):
    names = list(jobs)
    for name in names:  # warm-up
        jobs[name]()
    calls = {}
    for name in names:
        fastest = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            jobs[name]()
            fastest = min(fastest, time.perf_counter() - start)
        calls[name] = 1 if fastest >= MIN_SAMPLE_S else min(1000, int(MIN_SAMPLE_S / max(fastest, 1e-9)) + 1)
    samples = {name: [] for name in names}
    spent = {name: 0.0 for name in names}
    rng = random.Random(0x9E3779B9)
    while True:
        order = names[:]
        rng.shuffle(order)
        ran = False
        for name in order:
            if len(samples[name]) >= 20000 or (len(samples[name]) >= min_reps and spent[name] >= budget_s):
                continue
            ran = True
            k = calls[name]
            f = jobs[name]
            start = time.perf_counter()
            for _ in range(k):
                f()
            elapsed = time.perf_counter() - start
            samples[name].append(elapsed / k)
            spent[name] += elapsed
        if not ran:
            break
    out = {}
    for name, s in samples.items():
        s.sort()
        out[name] = (s[(len(s) - 1) // 2], s[0], s[-1], len(s))
    return out


def fmt(seconds):
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3f} us"
    return f"{seconds * 1e3:.3f} ms"


def cpu_model():
    """The CPU's model name as lscpu shows it (/proc/cpuinfo), or "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def suite_summary(title, layers, records):
    """One training step (train + backward of every layer, by its count) and one inference pass."""
    median = {(r["case"], r["mode"], r["implementation"]): r["median_ns"] for r in records}
    parts = []
    for what, modes in (("training step (forward + backward)", ("train", "backward")), ("inference pass", ("eval",))):
        totals = []
        for impl in ("pytorch", "copy"):
            keys = [(name, mode, impl) for name in layers for mode in modes]
            if not all(k in median for k in keys):
                totals = None
                break
            totals.append(sum(layers[k[0]][1] * median[k] for k in keys) * 1e-9)
        if totals is None:
            parts.append(f"{what} not measured")
        else:
            parts.append(f"{what} {fmt(totals[0])} = {totals[0] / totals[1]:.2f}x copy ({fmt(totals[1])})")
    count = sum(c for _, c in layers.values())
    return f"{title} batch norm, {count} layers at batch 50, PyTorch: " + "; ".join(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    standard = [name for name in CASES if name.startswith("S")]
    parser.add_argument("--case", default=None, help="comma-separated, e.g. S1,S3 (default S1..S6)")
    parser.add_argument("--suite", choices=sorted(SUITES), default=None,
                        help="a network's batch-norm layers instead of the standard shapes")
    parser.add_argument("--mode", default=",".join(MODES), help="train, eval, backward")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="50 ms per implementation and row")
    parser.add_argument("--json", default=None, help="write bn-bench's JSON records here")
    parser.add_argument("--shape", default=None,
                        help="one shape instead, as bn-bench's --shape spells it, e.g. 32x960x7x7 (case custom)")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default=None,
                        help="its layout (default by rank: nc, ncl, nchw); nhwc takes the shape as N x H x W x C")
    args = parser.parse_args()
    if sum(a is not None for a in (args.suite, args.case, args.shape)) > 1:
        parser.error("give one of --case, --suite and --shape")
    if args.layout and not args.shape:
        parser.error("--layout goes with --shape")
    if args.shape:
        try:
            shape = [int(d) for d in args.shape.split("x")]
        except ValueError:
            parser.error(f"not a shape: {args.shape} (e.g. 32x960x7x7)")
        by_rank = {rank: name for name, (_, rank) in LAYOUTS.items() if name != "nhwc"}
        layout = args.layout or by_rank.get(len(shape))
        if layout is None or LAYOUTS[layout][1] != len(shape) or min(shape) < 1:
            parser.error(f"{args.shape}: a shape of rank 2, 3 or 4 with a matching --layout")
        torch_shape = (shape[0], shape[3], shape[1], shape[2]) if layout == "nhwc" else tuple(shape)
        CASES["custom"] = (torch_shape, layout.upper(), torch_shape[1])
        BENCH_SHAPES["custom"] = (shape, LAYOUTS[layout][0])
        cases = ["custom"]
    elif args.suite:
        cases = list(SUITES[args.suite][1])
    else:
        cases = args.case.split(",") if args.case else standard
        unknown = [name for name in cases if name not in CASES]
        if unknown:
            parser.error(f"not a case: {', '.join(unknown)} (S1..S6, or --suite)")
    command = shlex.join(["torch_bench.py"] + sys.argv[1:])
    cpu = cpu_model()
    if args.threads:
        torch.set_num_threads(args.threads)
    budget, min_reps = (0.05, 3) if args.quick else (0.4, 5)
    threads = torch.get_num_threads()
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {threads} thread(s), {capability}")
    print(f"{'case':5} {'mode':9} {'pytorch':>12} {'copy':>12} {'x copy':>7}")
    records = []
    with torch.no_grad():
        for name in cases:
            for mode in args.mode.split(","):
                jobs, n = jobs_for(name, mode)
                result = measure(jobs, budget, min_reps)
                layer, copy = result["pytorch"][0], result["copy"][0]
                print(f"{name:5} {mode:9} {fmt(layer):>12} {fmt(copy):>12} {layer / copy:6.2f}x")
                moved = 4 * n * (3 if mode == "backward" else 2)
                shape, axes = BENCH_SHAPES[name]
                for impl, (median, lo, hi, _reps) in result.items():
                    records.append({
                        "case": name, "dtype": "f32", "shape": shape, "axes": axes, "mode": mode,
                        "implementation": impl, "threads": threads, "backend": f"torch-{torch.__version__}-{capability}",
                        "median_ns": round(median * 1e9), "min_ns": round(lo * 1e9),
                        "max_ns": round(hi * 1e9), "gbps": moved / median / 1e9,
                        "copy_ratio": median / copy, "naive_speedup": None,
                        "command": command, "cpu": cpu,
                    })
    if args.suite:
        title, layers = SUITES[args.suite]
        print(suite_summary(title, layers, records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
