# Sourced by the GPU-machine scripts (run.sh, blora_gpu_check.sh, memory_check.sh,
# scripts/bench/device_bench.sh): unpacks every carried .device/NAME.xz (CUDA binaries packed by
# ../shared/gpu/cuda-build.sh and scripts/device/pack_cuda_tests.sh) into .device/NAME unless an
# unpacked copy newer than the archive is there already (a warm machine keeps it between calls),
# and puts CUDA's libraries on the loader's path.
for f in .device/*.xz; do
  [ -e "$f" ] || continue
  [ -x "${f%.xz}" ] && [ "${f%.xz}" -nt "$f" ] && continue
  python3 -c "import lzma,shutil,sys;shutil.copyfileobj(lzma.open(sys.argv[1]),open(sys.argv[1][:-3],'wb'))" "$f"
  chmod +x "${f%.xz}"
done
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
