# Side-by-side Markdown table of `bayeslora bench train` rows and PyTorch anchor rows (JSON lines or
# JSON arrays, as scripts/bench/device_bench.sh writes them), matched on shape, batch, sequence
# length, LoRA targets and optimizer. Our rows with activation checkpointing (`gradient_checkpointing`,
# or run ids ending in -ck) get their own line, beside the anchor's run without it. With several
# PyTorch variants (eager, torch.compile, Liger-Kernel) per run, each of our rows is compared with
# the fastest one that ran, named in the table with its time to first step.
#
#   python3 scripts/bench/table.py bench-out/bayeslora.jsonl bench-out/pytorch.jsonl
import json, os, sys


def rows(path):
    if not os.path.exists(path):
        return []
    text = open(path).read().strip()
    if not text:
        return []
    if text.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def key(r):
    shape = os.path.splitext(os.path.basename(r.get("shape") or r.get("model") or "?"))[0]
    t = r.get("targets")
    targets = "all-linear" if t == "all-linear" else ",".join(m.replace("_proj", "") for m in (t or []))
    ck = bool(r.get("gradient_checkpointing") or str(r.get("id", "")).endswith("-ck"))
    return (shape, r.get("bsz"), r.get("seq"), targets, r.get("opt"), ck)


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def main(ours_path, theirs_path):
    ours, theirs = {}, {}
    for r in rows(ours_path):
        ours[key(r)] = r
    for r in rows(theirs_path):
        k, best = key(r), theirs.get(key(r))
        # keep the fastest variant that ran (an error row only when none ran)
        if best is None or (r.get("tokens_per_s") or 0) > (best.get("tokens_per_s") or 0):
            theirs[k] = r
    keys = list(dict.fromkeys(list(ours) + list(theirs)))
    device = next((r.get("device_name") for r in list(ours.values()) + list(theirs.values()) if r.get("device_name")), "?")
    print(f"device: {device}\n")
    print("| shape | B × T | LoRA | opt | bayeslora tok/s | best PyTorch tok/s (variant, s to 1st step) | ratio "
          "| bayeslora step ms | PyTorch step ms | bayeslora peak GiB (device) | PyTorch peak GiB (allocated / device) "
          "| MFU ours / PyTorch |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k in keys:
        a, b = ours.get(k, {}), theirs.get(k[:5] + (False,), {})
        ta, tb = a.get("tokens_per_s"), b.get("tokens_per_s")
        ratio = f"{ta / tb:.2f}×" if ta and tb else "—"
        cell_a = a.get("error") or fmt(ta, ",.0f")
        cell_b = b.get("error") or fmt(tb, ",.0f")
        if tb:
            cell_b += f" ({b.get('variant', 'eager')}, {fmt(b.get('time_to_first_step_s'), '.0f')})"
        peak_b = f"{fmt(b.get('peak_gib'), '.1f')} / {fmt(b.get('peak_device_gib'), '.1f')}"
        mfu = f"{fmt(a.get('mfu_vs_989'), '.3f')} / {fmt(b.get('mfu_vs_989'), '.3f')}"
        print(f"| {k[0]} | {k[1]} × {k[2]} | {k[3]} | {k[4]}{' + ckpt' if k[5] else ''} | {cell_a} | {cell_b} | {ratio} "
              f"| {fmt(a.get('step_ms'), '.1f')} | {fmt(b.get('step_ms'), '.1f')} | {fmt(a.get('peak_gib'), '.1f')} "
              f"| {peak_b} | {mfu} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
