# Step-time breakdown of one training step from an Nsight Compute kernel list: the kernels of the
# last step (from the kernel after the previous optimizer update to the last update, found by a
# name fragment) grouped into categories, then the slowest kernels by name, grid and block.
#   ncu --metrics gpu__time_duration.sum --csv --log-file OUT.csv \
#     .device/bayeslora bench train ... --max-steps 1 --warmup 1
#   python3 scripts/bench/ncu_summary.py OUT.csv [--step-marker adam] [--top 25]
# Times are ncu's (clocks locked to base: compare shares, not milliseconds, with a timed step).
import argparse, collections, csv, re


def category(name):
    n = name.lower()
    for cat, frags in [
        ("cuBLAS GEMM", ("nvjet", "gemm", "cutlass", "splitkreduce")),
        ("flash attention", ("flash",)),
        ("loss head (ce)", ("ce_fwd", "ce_bwd", "cross_entropy")),
        ("norm/rope/swiglu", ("rms", "rope", "swiglu")),
        ("head layout", ("heads_",)),
        ("casts", ("cast_",)),
        ("copies", ("copy",)),
        ("adds", ("badd",)),
        ("optimizer", ("adam", "ivon")),
    ]:
        if any(f in n for f in frags):
            return cat
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--step-marker", default="adam", help="name fragment of the optimizer's update kernel")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    with open(a.csv) as f:
        lines = [l for l in f if l.startswith('"')]
    rows = [
        (r["Kernel Name"], r["Grid Size"], r["Block Size"], float(r["Metric Value"].replace(",", "")) / 1e3)
        for r in csv.DictReader(lines)
        if r["Metric Name"] == "gpu__time_duration.sum"
    ]
    marks = [i for i, r in enumerate(rows) if a.step_marker in r[0].lower()]
    if not marks:
        raise SystemExit(f"no kernel name contains {a.step_marker!r}: pass --step-marker")
    lo = marks[-2] + 1 if len(marks) > 1 else 0
    step = rows[lo : marks[-1] + 1]
    total = sum(r[3] for r in step)
    print(f"last step: {len(step)} kernels, {total / 1e3:.3f} ms at ncu clocks")
    cats = collections.defaultdict(lambda: [0, 0.0])
    kern = collections.defaultdict(lambda: [0, 0.0])
    for name, grid, block, us in step:
        c = cats[category(name)]
        c[0] += 1
        c[1] += us
        short = re.sub(r"^void ", "", name.split("(")[0])[:60]
        k = kern[(short, grid, block)]
        k[0] += 1
        k[1] += us
    for c, (n, us) in sorted(cats.items(), key=lambda x: -x[1][1]):
        print(f"{100 * us / total:5.1f}% {us / 1e3:8.3f} ms n={n:5d} {c}")
    print("-- slowest kernels of the last step (name, grid, block)")
    for (short, grid, block), (n, us) in sorted(kern.items(), key=lambda x: -x[1][1])[: a.top]:
        print(f"{100 * us / total:5.1f}% {us / 1e3:8.3f} ms n={n:5d} {us / n:7.1f} us each  {short} {grid} {block}")


if __name__ == "__main__":
    main()
