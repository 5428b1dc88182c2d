#!/usr/bin/env python3
"""Stages a large file (a GGUF) onto the GPU machine in chunks, since one device call carries at
most 64 MiB with the working tree. Resumable and checksummed; standard library only.

Here, once:
    python3 scripts/device/stage.py prep FILE [--chunk-mib 35] [--prefix P]
        writes chunk i of FILE to .stage/<P><i>/<name>.<i> with its SHA-256, for every i
Then on the device, one call per chunk, in the same warm machine (carry [".stage/<i>"]; the
working tree is ~29 MB, so a 35 MiB chunk keeps a call under 64 MiB):
    python3 scripts/device/stage.py recv [--into DIR]
        checks every carried chunk against its SHA-256 and moves it to DIR (default ~/stage)
    python3 scripts/device/stage.py assemble NAME SIZE SHA256 OUT [--into DIR]
        when all chunks are there: concatenates them, checks size and SHA-256, renames to OUT
    python3 scripts/device/stage.py status [--into DIR]
        lists the chunks received (to resume after a lost call: prep the missing ones)
"""
import argparse
import hashlib
import json
import os
import sys


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 22)
            if not b:
                return h.hexdigest()
            h.update(b)


def prep(a):
    size = os.path.getsize(a.file)
    chunk = a.chunk_mib << 20
    n = (size + chunk - 1) // chunk
    name = os.path.basename(a.file)
    with open(a.file, "rb") as f:
        for i in range(n):
            data = f.read(chunk)
            folder = os.path.join(".stage", f"{a.prefix}{i:03}")
            os.makedirs(folder, exist_ok=True)
            part = os.path.join(folder, f"{name}.{i:03}")
            with open(part, "wb") as out:
                out.write(data)
            meta = {"name": name, "index": i, "count": n, "sha256": hashlib.sha256(data).hexdigest()}
            with open(part + ".json", "w") as out:
                json.dump(meta, out)
    print(f"{n} chunks of {a.chunk_mib} MiB under .stage/{a.prefix}NNN/")


def recv(a):
    os.makedirs(a.into, exist_ok=True)
    found = []
    for root, _, files in os.walk(".stage"):
        found += [os.path.join(root, f) for f in files if f.endswith(".json")]
    for f in sorted(found):
        meta = json.load(open(f))
        part = f[: -len(".json")]
        got = sha256_of(part)
        if got != meta["sha256"]:
            sys.exit(f"error: {part}: SHA-256 {got}, expected {meta['sha256']}; send this chunk again")
        os.replace(part, os.path.join(a.into, os.path.basename(part)))
        os.remove(f)
        print(f"received {meta['name']} chunk {meta['index'] + 1}/{meta['count']}")


def status(a):
    have = sorted(os.listdir(a.into)) if os.path.isdir(a.into) else []
    print(" ".join(have) or "nothing staged")


def assemble(a):
    parts = sorted(p for p in os.listdir(a.into) if p.startswith(a.name + ".") and p[len(a.name) + 1:].isdigit())
    chunk_ids = [int(p[len(a.name) + 1:]) for p in parts]
    if chunk_ids != list(range(len(chunk_ids))):
        sys.exit(f"error: chunks of {a.name} present: {chunk_ids}; send the missing ones")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    tmp = a.out + ".partial"
    h = hashlib.sha256()
    n = 0
    with open(tmp, "wb") as out:
        for p in parts:
            with open(os.path.join(a.into, p), "rb") as f:
                data = f.read()
            h.update(data)
            out.write(data)
            n += len(data)
    if n != a.size or h.hexdigest() != a.sha256:
        os.remove(tmp)
        sys.exit(f"error: assembled {n} bytes, SHA-256 {h.hexdigest()}; expected {a.size}, {a.sha256}")
    os.replace(tmp, a.out)
    for p in parts:
        os.remove(os.path.join(a.into, p))
    print(f"assembled {a.out} ({n} bytes, SHA-256 checked)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prep")
    p.add_argument("file")
    p.add_argument("--chunk-mib", type=int, default=35)
    p.add_argument("--prefix", default="", help="chunk folders .stage/<prefix>NNN (several files at once)")
    for name in ("recv", "status"):
        q = sub.add_parser(name)
        q.add_argument("--into", default=os.path.expanduser("~/stage"))
    q = sub.add_parser("assemble")
    q.add_argument("name")
    q.add_argument("size", type=int)
    q.add_argument("sha256")
    q.add_argument("out")
    q.add_argument("--into", default=os.path.expanduser("~/stage"))
    a = ap.parse_args()
    {"prep": prep, "recv": recv, "status": status, "assemble": assemble}[a.cmd](a)


if __name__ == "__main__":
    main()
