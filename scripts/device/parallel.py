#!/usr/bin/env python3
"""Runs several `bayeslora compare` sweeps at once on one GPU machine, each split into parallel
processes (one per task, seed, or task × seed) that share the sweep's `out` folder: cells are
separate files written atomically, so the processes never touch the same file, and a sweep cut
off by the time limit resumes at its unfinished cells on the next call (same warm machine).
Small models are launch-bound (MiniLM uses a fraction of an H100), so a split sweep finishes in
about the time of its slowest part.

    python3 scripts/device/parallel.py SECONDS SPEC [SPEC ...]

SPEC is CONFIG[:SPLIT][+OPTION...]:
  SPLIT     none (default) or any of task, seed, method joined by commas (task,seed;
            task,method; ...): how the sweep is split into processes (parts)
  +methods=a/b/c   run only these methods of the file (the others are left alone)
  +tasks=a/b       run only these tasks of the file
  +prefill=DIR[@m/a>b]  copy DIR's cells (a committed docs/compare/<name>/cells) of the tasks
                   this sweep runs (the file's, or those of +tasks=) into `out` first, so that cells measured in an earlier session are not trained again;
                   after @, only these methods, `a>b` copying method a's cells as method b (a
                   cell measured with settings identical to b's; the cell's label is rewritten).
                   May be given more than once.
  +pool=NAME:N     at most N processes of pool NAME run at once (sweeps may share a pool; parts
                   wait in the order of the command line); default: no limit
  +after=NAME      start only when the sweep named NAME (a config stem) has ended
  +as=NAME        the sweep's name in logs and for +after (default: the config's stem), so
                   that one file can run as two sweeps (e.g. two method sets)
  +ess_from=NAME   the IVON `ess` of this sweep is chosen from sweep NAME's cells: the method
                   ivon_ess<X> with the lowest mean K-sample NLL over NAME's tasks gives X
                   (written to $OUT/<stem>-choice.txt); implies +after=NAME
  +ivon_from=NAME  this sweep's [run.train.ivon] takes the overrides of NAME's IVON method with
                   the highest mean task metric (MCC, Pearson or accuracy of its K-sample
                   predictive) over NAME's cells; implies +after=NAME

A part whose cells all exist is not started (a finished Qwen part would load the model for
nothing).

The parts share the GPU through NVIDIA MPS (started and stopped here; PARALLEL_MPS=0: without),
which lets launch-bound small models run their kernels side by side.

Keep the processes within the GPU's memory: one Qwen2.5-Coder-1.5B process holds ~10-15 GB
in bf16 (eight on an 80 GB H100 ran out of memory), a MiniLM one ~1-2 GB.

Each process logs to logs/<stem>-<part>.log; when a sweep's processes end, the sweep is
aggregated (`compare --aggregate-only`: summary.md/.csv/.json and plots; skipped when the time
is up) and its summary copied to logs/<stem>-summary.md; at the end every sweep's cells,
summaries and PNG plots and the logs go into one $OUT/sweeps.tgz, the only file in $OUT (a
device call returns only a few files). Parts get the time left minus 20 s; keep the device
call's timeout ≥ SECONDS + 40 for the packing. Unpacks .device/*.xz itself; staged models are read from BAYESLORA_ASSETS (default ~/assets).
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


def with_ivon(text, overrides):
    """The config text with the keys of `overrides` set in its [run.train.ivon] table."""
    m = re.search(r"^\[run\.train\.ivon\]\s*$", text, re.M)
    if not m:
        raise SystemExit("parallel: no [run.train.ivon] table to set IVON settings in")
    head, tail = text[: m.end()], text[m.end():]
    nxt = re.search(r"^\[", tail, re.M)
    body, rest = (tail[: nxt.start()], tail[nxt.start():]) if nxt else (tail, "")
    for key, value in overrides.items():
        if isinstance(value, bool):
            v = str(value).lower()
        elif isinstance(value, float):
            v = f"{value:g}"
        else:
            v = str(value)
        body, n = re.subn(rf"^{re.escape(key)}\s*=.*$", f"{key} = {v}", body, count=1, flags=re.M)
        if n == 0:
            body = f"\n{key} = {v}" + body
    return head + body + rest


def with_ess(text, ess):
    """The config text with [run.train.ivon] ess set to `ess`."""
    return with_ivon(text, {"ess": float(ess)})


def prefill(spec, out, tasks):
    """Copies the cells of `DIR[@m/a>b]` of the sweep's `tasks` into out/cells (see
    +prefill): existing cells are kept, other tasks' cells are left out (the summary would list
    them)."""
    src_dir, _, sel = spec.partition("@")
    if not os.path.isdir(src_dir):
        print(f"parallel: prefill {src_dir}: no such folder, nothing copied", flush=True)
        return
    rename = None
    if sel:
        rename = {}
        for item in sel.split("/"):
            a, _, b = item.partition(">")
            rename[a] = b or a
    copied = 0
    for src in glob.glob(os.path.join(src_dir, "*", "*", "*.json")):
        task, method, name = os.path.relpath(src, src_dir).split(os.sep)
        if task not in tasks or (rename is not None and method not in rename):
            continue
        new = rename[method] if rename is not None else method
        target = os.path.join(out, "cells", task, new, name)
        if os.path.exists(target):
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = target + ".tmp"
        if new == method:
            shutil.copyfile(src, tmp)  # byte for byte
        else:
            cell = json.load(open(src))
            cell["method"] = new
            for r in cell.get("results", []):
                r["method"] = new
            cell.setdefault("params", {})["prefilled_from"] = f"{src_dir}/{task}/{method}/{name}"
            with open(tmp, "w") as f:
                json.dump(cell, f, indent=2)
        os.replace(tmp, target)
        copied += 1
    print(f"parallel: prefill {spec}: {copied} cells copied into {out}", flush=True)


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
        self.after, self.ess_from, self.ivon_from, self.prefill = None, None, None, []
        self.pool, self.pool_size = None, None
        for o in opts:
            k, _, v = o.partition("=")
            if k == "methods":
                self.methods = v.split("/")
            elif k == "tasks":
                self.cfg["tasks"] = v.split("/")
            elif k == "prefill":
                self.prefill.append(v)
            elif k == "pool":
                name, _, n = v.partition(":")
                self.pool, self.pool_size = name, int(n)
            elif k == "ivon_from":
                self.ivon_from = self.after = v
            elif k == "as":
                self.stem = v
            elif k == "after":
                self.after = v
            elif k == "ess_from":
                self.ess_from = self.after = v
            else:
                raise SystemExit(f"parallel: unknown option +{k} in {spec}")
        self.procs = []
        self.queue = []
        self.started = False
        self.aggregated = False

    def parts(self):
        """(name, tasks, seeds, methods) per process: the product over the split's dimensions."""
        dims = [] if self.split == "none" else self.split.split(",")
        for d in dims:
            if d not in ("task", "seed", "method"):
                raise SystemExit(f"parallel: unknown split {self.split!r} (task, seed, method, joined by commas; or none)")
        parts = [("", self.cfg["tasks"], self.cfg["seeds"], self.methods)]
        for d in ("task", "seed", "method"):
            if d not in dims:
                continue
            nxt = []
            for name, t, s, m in parts:
                if d == "task":
                    nxt += [(f"{name}-{x}", [x], s, m) for x in t]
                elif d == "seed":
                    nxt += [(f"{name}-s{x}", t, [x], m) for x in s]
                else:
                    nxt += [(f"{name}-{x}", t, s, [x]) for x in m]
            parts = nxt
        return [(name.lstrip("-") or "all", t, s, m) for name, t, s, m in parts]

    def part_done(self, tasks, seeds, methods):
        return all(os.path.exists(os.path.join(self.out, "cells", t, m, f"seed{s}.json"))
                   for t in tasks for s in seeds for m in methods)

    def start(self, out_dir, sweeps):
        """Writes each part's config and queues the parts that have cells left to make."""
        text = self.text
        if self.ess_from:
            ess = choose_ess(sweeps[self.ess_from], out_dir)
            text = with_ess(text, ess)
        if self.ivon_from:
            text = with_ivon(text, choose_ivon(sweeps[self.ivon_from], out_dir))
        for spec in self.prefill:
            prefill(spec, self.out, self.cfg["tasks"])
        os.makedirs(WORK, exist_ok=True)
        for name, tasks, seeds, methods in self.parts():
            if self.part_done(tasks, seeds, methods):
                continue
            sub = os.path.join(WORK, f"{self.stem}-{name}.toml")
            with open(sub, "w") as f:
                f.write(with_lists(text, tasks=tasks, seeds=seeds, methods=methods))
            self.queue.append((name, sub))
        self.started = True
        print(f"parallel: {self.stem}: {len(self.queue)} parts to run ({self.split}), methods {self.methods}",
              flush=True)

    def launch(self, limit, out_dir):
        """Starts the next queued part with `limit` seconds to run."""
        name, sub = self.queue.pop(0)
        log = open(os.path.join(out_dir, f"{self.stem}-{name}.log"), "a")
        cmd = ["timeout", "-k", "15", "-s", "INT", str(int(limit)), BIN, "compare", "--config", sub]
        self.procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
        print(f"parallel: {self.stem}: started {name} ({int(limit)} s)", flush=True)

    def running(self):
        return sum(p.poll() is None for _, p in self.procs)

    def done(self):
        return self.started and not self.queue and all(p.poll() is not None for _, p in self.procs)

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


def task_metric(metrics):
    """The task's headline metric: MCC (CoLA), Pearson (STS-B) or accuracy."""
    for k in ("mcc", "pearson", "acc"):
        if k in metrics:
            return metrics[k]
    raise SystemExit(f"parallel: no task metric in {sorted(metrics)}")


def choose_ivon(source, out_dir):
    """The [run.train.ivon] overrides of `source`'s IVON method whose K-sample predictive has the
    highest mean task metric over the (task, seed) pairs every IVON method has a cell for."""
    cfg = source.cfg
    methods = cfg.get("method", {})
    ivons = [m for m in cfg["methods"] if methods.get(m, {}).get("kind", m) == "ivon"]
    scores = {m: {} for m in ivons}
    for m in ivons:
        for path in glob.glob(os.path.join(source.out, "cells", "*", m, "*.json")):
            cell = json.load(open(path))
            k = [r for r in cell["results"] if r["num_samples"] > 1] or cell["results"]
            scores[m][(cell["task"], cell["seed"])] = task_metric(k[-1]["metrics"])
    common = set.intersection(*(set(v) for v in scores.values())) if ivons else set()
    if not common:
        raise SystemExit(f"parallel: {source.stem} has no (task, seed) with a cell of every IVON method {ivons}")
    means = {m: sum(scores[m][c] for c in common) / len(common) for m in ivons}
    best = max(means, key=means.get)
    overrides = methods.get(best, {}).get("run", {}).get("train", {}).get("ivon", {})
    line = (f"IVON settings chosen from {source.stem}: {best} {overrides} (mean task metric over "
            f"{sorted(common)}: {means})")
    print(f"parallel: {line}", flush=True)
    with open(os.path.join(out_dir, f"{source.stem}-choice.txt"), "a") as f:
        f.write(line + "\n")
    return overrides


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


def start_mps():
    """Starts NVIDIA's MPS control daemon, so that the parts' kernels share the GPU at once
    instead of by time slices (eight MiniLM B-LoRA processes on an H100: 147 steps/s together
    with MPS, 70 without; scripts/device/share_check.sh). The parts inherit its pipe directory.
    Off with PARALLEL_MPS=0, or where nvidia-cuda-mps-control is missing. Returns whether it
    runs (then stop_mps ends it)."""
    if os.environ.get("PARALLEL_MPS", "1") == "0" or shutil.which("nvidia-cuda-mps-control") is None:
        print("parallel: without MPS (PARALLEL_MPS=0 or no nvidia-cuda-mps-control)", flush=True)
        return False
    for key, sub in (("CUDA_MPS_PIPE_DIRECTORY", "mps-pipe"), ("CUDA_MPS_LOG_DIRECTORY", "mps-log")):
        os.environ.setdefault(key, os.path.join(WORK, sub))
        os.makedirs(os.environ[key], exist_ok=True)
    r = subprocess.run(["nvidia-cuda-mps-control", "-d"], capture_output=True, text=True)
    if r.returncode != 0:  # e.g. a daemon left by a call cut off earlier: it serves this one too
        print(f"parallel: MPS daemon not started ({(r.stderr or r.stdout).strip()}); using any running one",
              flush=True)
        return False
    print("parallel: MPS daemon started", flush=True)
    return True


def stop_mps():
    subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, capture_output=True)
    print("parallel: MPS daemon stopped", flush=True)


def pack(sweeps, log_dir, out_dir):
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
        for p in sorted(glob.glob(os.path.join(log_dir, "*"))):
            tar.add(p, arcname=os.path.join("logs", os.path.basename(p)))
    print(f"parallel: packed {path}", flush=True)


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    prepare_env()
    limit = float(sys.argv[1])
    end = time.time() + limit
    out_dir = os.environ.get("OUT", "/tmp/out")
    os.makedirs(out_dir, exist_ok=True)
    # Logs, summaries and choices go into the tarball, not loose into $OUT: a device call brings
    # back only a few files, so $OUT ends with sweeps.tgz alone.
    log_dir = os.path.join(WORK, time.strftime("logs-%Y%m%d-%H%M%S"))
    os.makedirs(log_dir, exist_ok=True)
    sweeps = {}
    for spec in sys.argv[2:]:
        s = Sweep(spec)
        sweeps[s.stem] = s
    for s in sweeps.values():
        if s.after is not None and s.after not in sweeps:
            raise SystemExit(f"parallel: {s.stem} waits for sweep {s.after!r}, which is not on the "
                             f"command line (name it there too; finished cells are not rerun)")
    mps = start_mps()
    try:
        run(sweeps, end, log_dir)
    finally:
        if mps:
            stop_mps()
    for s in sweeps.values():
        cells = glob.glob(os.path.join(s.out, "cells", "*", "*", "*.json"))
        print(f"parallel: {s.stem}: {len(cells)} cells in {s.out}", flush=True)
    pack(sweeps, log_dir, out_dir)


def run(sweeps, end, log_dir):
    """Starts the sweeps' parts as their pools and `+after` allow, until every sweep has ended
    and been aggregated (or the time is up)."""
    while True:
        for s in sweeps.values():
            if not s.started and (s.after is None or sweeps[s.after].aggregated):
                try:
                    s.start(log_dir, sweeps)
                except SystemExit as e:
                    print(f"parallel: {s.stem}: not started: {e}", flush=True)
                    s.started, s.aggregated = True, True
        # Launch queued parts, in command-line order, while their pool has room.
        for s in sweeps.values():
            while s.queue:
                left = end - time.time() - 20
                if left <= 30:
                    print(f"parallel: {s.stem}: {len(s.queue)} parts not started, {left:.0f} s left", flush=True)
                    s.queue.clear()
                    break
                if s.pool is not None:
                    busy = sum(o.running() for o in sweeps.values() if o.pool == s.pool)
                    if busy >= s.pool_size:
                        break
                s.launch(left, log_dir)
        for s in sweeps.values():
            if s.done() and not s.aggregated:
                if time.time() < end - 15:
                    s.aggregate(log_dir)
                else:  # aggregating a large sweep takes a while: keep the call within its limit
                    print(f"parallel: {s.stem}: not aggregated (time is up; run --aggregate-only)", flush=True)
                    s.aggregated = True
        if all(s.aggregated for s in sweeps.values()):
            break
        time.sleep(2)


if __name__ == "__main__":
    main()
