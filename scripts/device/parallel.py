#!/usr/bin/env python3
"""Runs several `bayeslora compare` sweeps at once on one GPU machine, each split into parallel
processes (one per task, seed, or task × seed) that share the sweep's `out` folder: cells are
separate files written atomically, so the processes never touch the same file, and a sweep cut
off by the time limit resumes at its unfinished cells on the next call (same warm machine).
Small models are launch-bound (MiniLM uses a fraction of an H100), so a split sweep finishes in
about the time of its slowest part.

    python3 scripts/device/parallel.py SECONDS SPEC [SPEC ...]

SPEC is CONFIG[:SPLIT][+OPTION...]:
  SPLIT     task | seed | task,seed | none (default): how the sweep is split into processes
  +methods=a/b/c   run only these methods of the file (the others are left alone)
  +prefill=DIR     copy DIR's cells (a committed docs/compare/<name>/cells) into `out` first,
                   so that cells measured in an earlier session are not trained again
  +after=NAME      start only when the sweep named NAME (a config stem) has ended
  +as=NAME        the sweep's name in logs and for +after (default: the config's stem), so
                   that one file can run as two sweeps (e.g. two method sets)
  +ess_from=NAME   the IVON `ess` of this sweep is chosen from sweep NAME's cells: the method
                   ivon_ess<X> with the lowest mean K-sample NLL over NAME's tasks gives X
                   (written to $OUT/<stem>-choice.txt); implies +after=NAME

Keep the processes within the GPU's memory: one Qwen2.5-Coder-1.5B process holds ~10-15 GB
in bf16 (eight on an 80 GB H100 ran out of memory), a MiniLM one ~1-2 GB.

Each process logs to $OUT/<stem>-<part>.log; when a sweep's processes end, the sweep is
aggregated (`compare --aggregate-only`: summary.md/.csv/.json and plots) and its summary and
its summary is copied to $OUT/<stem>-summary.md; at the end every sweep's cells, summaries
and PNG plots go into one $OUT/sweeps.tgz (a device call returns only a few files). Unpacks .device/*.xz itself; staged models are read from BAYESLORA_ASSETS (default ~/assets).
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib

BIN = os.environ.get("BAYESLORA_BIN", ".device/bayeslora")
WORK = os.path.join(os.environ.get("TMPDIR", "/tmp"), "parallel-sweeps")


def list_line(key, values):
    return f"{key} = {json.dumps(values)}"


def with_lists(text, **lists):
    """The config text with its top-level `key = [...]` lines replaced (one line each)."""
    for key, values in lists.items():
        pat = re.compile(rf"^{key}\s*=\s*\[[^\]]*\]", re.M)
        if not pat.search(text):
            raise SystemExit(f"parallel: no top-level `{key} = [...]` line to replace")
        text = pat.sub(list_line(key, values), text, count=1)
    return text


def with_ess(text, ess):
    """The config text with [run.train.ivon] ess set to `ess`."""
    m = re.search(r"^\[run\.train\.ivon\]\s*$", text, re.M)
    if not m:
        raise SystemExit("parallel: no [run.train.ivon] table to set ess in")
    head, tail = text[: m.end()], text[m.end():]
    nxt = re.search(r"^\[", tail, re.M)
    body, rest = (tail[: nxt.start()], tail[nxt.start():]) if nxt else (tail, "")
    body, n = re.subn(r"^ess\s*=.*$", f"ess = {ess:g}", body, count=1, flags=re.M)
    if n == 0:
        body = f"\ness = {ess:g}" + body
    return head + body + rest


class Sweep:
    def __init__(self, spec):
        path, *opts = spec.split("+")
        self.split = "none"
        if ":" in path:
            path, self.split = path.split(":", 1)
        self.path = path
        self.stem = os.path.splitext(os.path.basename(path))[0]
        self.text = open(path).read()
        self.cfg = tomllib.loads(self.text)
        self.out = self.cfg["out"]
        self.methods = list(self.cfg["methods"])
        self.after, self.ess_from, self.prefill = None, None, None
        for o in opts:
            k, _, v = o.partition("=")
            if k == "methods":
                self.methods = v.split("/")
            elif k == "prefill":
                self.prefill = v
            elif k == "as":
                self.stem = v
            elif k == "after":
                self.after = v
            elif k == "ess_from":
                self.ess_from = self.after = v
            else:
                raise SystemExit(f"parallel: unknown option +{k} in {spec}")
        self.procs = []
        self.started = False
        self.aggregated = False

    def parts(self):
        tasks, seeds = self.cfg["tasks"], self.cfg["seeds"]
        if self.split == "none":
            return [("all", tasks, seeds)]
        if self.split == "task":
            return [(t, [t], seeds) for t in tasks]
        if self.split == "seed":
            return [(f"s{s}", tasks, [s]) for s in seeds]
        if self.split in ("task,seed", "seed,task"):
            return [(f"{t}-s{s}", [t], [s]) for t in tasks for s in seeds]
        raise SystemExit(f"parallel: unknown split {self.split!r} (task, seed, task,seed, none)")

    def start(self, limit, out_dir, sweeps):
        text = self.text
        if self.ess_from:
            ess = choose_ess(sweeps[self.ess_from], out_dir)
            text = with_ess(text, ess)
        if self.prefill and os.path.isdir(self.prefill):
            dst = os.path.join(self.out, "cells")
            for src in glob.glob(os.path.join(self.prefill, "*", "*", "*.json")):
                rel = os.path.relpath(src, self.prefill)
                target = os.path.join(dst, rel)
                if not os.path.exists(target):
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.copy(src, target)
        os.makedirs(WORK, exist_ok=True)
        for name, tasks, seeds in self.parts():
            sub = os.path.join(WORK, f"{self.stem}-{name}.toml")
            with open(sub, "w") as f:
                f.write(with_lists(text, tasks=tasks, seeds=seeds, methods=self.methods))
            log = open(os.path.join(out_dir, f"{self.stem}-{name}.log"), "a")
            cmd = ["timeout", "-s", "INT", str(int(limit)), BIN, "compare", "--config", sub]
            self.procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
        self.started = True
        print(f"parallel: {self.stem}: {len(self.procs)} processes ({self.split}), methods {self.methods}", flush=True)

    def done(self):
        return self.started and all(p.poll() is not None for _, p in self.procs)

    def aggregate(self, out_dir):
        rcs = {n: p.returncode for n, p in self.procs}
        print(f"parallel: {self.stem}: ended, return codes {rcs}", flush=True)
        # Aggregate with the whole file (every method, task and seed), so the summary holds the
        # cells of earlier calls and sessions too.
        with open(os.path.join(out_dir, f"{self.stem}.log"), "a") as log:
            subprocess.run([BIN, "compare", "--config", self.path, "--aggregate-only"], stdout=log,
                           stderr=subprocess.STDOUT)
        if os.path.isdir(self.out):
            s = os.path.join(self.out, "summary.md")
            if os.path.exists(s):
                shutil.copy(s, os.path.join(out_dir, f"{self.stem}-summary.md"))
        self.aggregated = True


def choose_ess(source, out_dir):
    """The ess of the ivon_ess<X> method of `source` with the lowest mean K-sample NLL."""
    nll = {}
    for path in glob.glob(os.path.join(source.out, "cells", "*", "ivon_ess*", "*.json")):
        cell = json.load(open(path))
        x = float(cell["method"][len("ivon_ess"):])
        k = [r for r in cell["results"] if r["num_samples"] > 1]
        if k:
            nll.setdefault(x, []).append(k[-1]["metrics"]["nll"])
    if not nll:
        raise SystemExit(f"parallel: no ivon_ess* cells in {source.out} to choose ess from")
    means = {x: sum(v) / len(v) for x, v in nll.items()}
    best = min(means, key=means.get)
    line = f"ess chosen from {source.stem}: {best:g} (mean K-sample NLL {means})"
    print(f"parallel: {line}", flush=True)
    with open(os.path.join(out_dir, f"{source.stem}-choice.txt"), "a") as f:
        f.write(line + "\n")
    return best


def prepare_env():
    """Unpacks .device/*.xz once (as scripts/device/run.sh does) and points the binary at the
    staged models and the CUDA libraries."""
    import lzma
    for xz in glob.glob(".device/*.xz"):
        exe = xz[:-3]
        if os.path.exists(exe) and os.path.getmtime(exe) >= os.path.getmtime(xz):
            continue
        with lzma.open(xz) as src, open(exe, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.chmod(exe, 0o755)
    os.environ.setdefault("BAYESLORA_ASSETS", os.path.expanduser("~/assets"))
    lib = "/usr/local/cuda/lib64"
    if lib not in os.environ.get("LD_LIBRARY_PATH", ""):
        os.environ["LD_LIBRARY_PATH"] = lib + ":" + os.environ.get("LD_LIBRARY_PATH", "")


def pack(sweeps, out_dir):
    """One tarball, $OUT/sweeps.tgz, with every sweep's cells, summaries and learned/reliability
    plots (a device call returns only a few files, so one archive carries them all)."""
    path = os.path.join(out_dir, "sweeps.tgz")
    with tarfile.open(path, "w:gz") as tar:
        for out in sorted({s.out for s in sweeps.values()}):
            for p in sorted(glob.glob(os.path.join(out, "**", "*"), recursive=True)):
                rel = os.path.relpath(p, out)
                keep = rel.startswith("cells/") or "/" not in rel or (
                    rel.startswith("plots/") and p.endswith(".png"))
                if os.path.isfile(p) and keep:
                    tar.add(p, arcname=os.path.join(os.path.basename(out), rel))
    print(f"parallel: packed {path}", flush=True)


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    prepare_env()
    limit = float(sys.argv[1])
    end = time.time() + limit
    out_dir = os.environ.get("OUT", "/tmp/out")
    os.makedirs(out_dir, exist_ok=True)
    sweeps = {}
    for spec in sys.argv[2:]:
        s = Sweep(spec)
        sweeps[s.stem] = s
    for s in sweeps.values():
        if s.after is not None and s.after not in sweeps:
            raise SystemExit(f"parallel: {s.stem} waits for sweep {s.after!r}, which is not on the "
                             f"command line (name it there too; finished cells are not rerun)")
    while True:
        for s in sweeps.values():
            if not s.started and (s.after is None or sweeps[s.after].aggregated):
                left = end - time.time() - 20
                if left > 30:
                    try:
                        s.start(left, out_dir, sweeps)
                    except SystemExit as e:
                        print(f"parallel: {s.stem}: not started: {e}", flush=True)
                        s.started, s.aggregated = True, True
                else:
                    s.started, s.aggregated = True, True
                    print(f"parallel: {s.stem}: not started, {left:.0f} s left", flush=True)
            if s.done() and not s.aggregated:
                s.aggregate(out_dir)
        if all(s.aggregated for s in sweeps.values()):
            break
        time.sleep(2)
    for s in sweeps.values():
        cells = glob.glob(os.path.join(s.out, "cells", "*", "*", "*.json"))
        print(f"parallel: {s.stem}: {len(cells)} cells in {s.out}", flush=True)
    pack(sweeps, out_dir)


if __name__ == "__main__":
    main()
