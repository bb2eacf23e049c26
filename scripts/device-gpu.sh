#!/usr/bin/env bash
# Proves GPU scheduling and exposure on a host with an NVIDIA GPU, from
# binaries built here (see scripts/device-sandbox.sh, whose suite it runs
# too: such hosts usually have the plain cgroup v2 hierarchy this machine
# has not). Nothing of Outpost is built on the GPU host; a small CUDA
# program is, with that host's nvcc, and given to an action as an input.
#
#   scripts/device-gpu.sh prepare   # here: .device/ with outpost, the
#                                   # sandbox suite and tests/gpu.rs
#   scripts/device-gpu.sh run       # there, from the repository root;
#                                   # evidence goes to $OUT (or .device/out)
#
# `run` stops at once, before changing anything, on a host without an
# NVIDIA GPU or without nvcc. Its evidence:
#   gpu-host.txt      the GPUs as nvidia-smi reports them, and the driver
#   nvcc.txt          the CUDA program's build, and its run on the host
#                     (which also has the driver make /dev/nvidia-uvm)
#   gpu-tests.txt     tests/gpu.rs: the agent's detected GPUs ("GPU found"
#                     lines), an action with gpu-count=1 in linux-sandbox
#                     (nvidia-smi -L, CUDA_VISIBLE_DEVICES, its /dev/nvidia*,
#                     the CUDA program's run), one without (no GPU, no
#                     /dev/nvidia*)
#   host.txt, sandbox-tests.txt   the sandbox suite (scripts/device-sandbox.sh)
#   summary.txt       each step's exit status
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.device

# The GPUs nvidia-smi lists, or a message saying why there are none.
gpu_check() {
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "no NVIDIA GPU on this host: nvidia-smi is not installed (no NVIDIA driver)" >&2
    return 1
  fi
  if ! nvidia-smi -L >/dev/null 2>&1 || ! nvidia-smi -L | grep -q '^GPU '; then
    echo "no NVIDIA GPU on this host: nvidia-smi lists none ($(nvidia-smi -L 2>&1 | head -n 1))" >&2
    return 1
  fi
  if [ ! -e /dev/nvidiactl ]; then
    echo "no NVIDIA GPU on this host: /dev/nvidiactl is missing (driver not loaded?)" >&2
    return 1
  fi
}

find_nvcc() {
  command -v nvcc 2>/dev/null && return 0
  local c
  for c in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc /opt/cuda/bin/nvcc; do
    [ -x "$c" ] && { echo "$c"; return 0; }
  done
  return 1
}

cuda_check_source() {
  cat <<'EOF'
// Adds two vectors on the GPU and checks the sum on the host.
#include <cstdio>
#include <cuda_runtime.h>

__global__ void add(const float *a, const float *b, float *c, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) c[i] = a[i] + b[i];
}

#define CHECK(call) do { cudaError_t e = (call); if (e != cudaSuccess) { \
  printf("cuda-check: %s failed: %s\n", #call, cudaGetErrorString(e)); return 1; } } while (0)

int main() {
  int count = 0;
  CHECK(cudaGetDeviceCount(&count));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  printf("cuda-check: %d device(s) visible; device 0: %s, compute capability %d.%d\n",
         count, prop.name, prop.major, prop.minor);
  const int n = 1 << 20;
  float *a, *b, *c;
  CHECK(cudaMallocManaged(&a, n * sizeof(float)));
  CHECK(cudaMallocManaged(&b, n * sizeof(float)));
  CHECK(cudaMallocManaged(&c, n * sizeof(float)));
  for (int i = 0; i < n; i++) { a[i] = i; b[i] = 2 * i; }
  add<<<(n + 255) / 256, 256>>>(a, b, c, n);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  for (int i = 0; i < n; i++) {
    if (c[i] != 3.0f * i) { printf("cuda-check: wrong sum at %d\n", i); return 1; }
  }
  printf("cuda-check: ok (%d sums on the GPU)\n", n);
  return 0;
}
EOF
}

case "${1:-}" in
prepare)
  scripts/device-sandbox.sh prepare
  cargo test --test gpu --no-run 2>&1 | tee /tmp/device-gpu-build.log
  test_bin=$(grep -o 'target/debug/deps/gpu-[0-9a-f]*' /tmp/device-gpu-build.log | tail -1)
  objcopy --strip-debug "$test_bin" "$dir/gpu-tests"
  ls -la "$dir"
  ;;
run)
  out=${OUT:-$dir/out}
  gpu_check || exit 3
  nvcc=$(find_nvcc) || {
    echo "no nvcc on this host (PATH, /usr/local/cuda*/bin): the CUDA program cannot be built" >&2
    exit 3
  }
  for f in outpost sandbox-tests gpu-tests outpost-path; do
    [ -e "$dir/$f" ] || { echo "$dir/$f is missing: run \`$0 prepare\` first and carry $dir" >&2; exit 2; }
  done
  mkdir -p "$out"
  {
    echo "== nvidia-smi -L"; nvidia-smi -L
    echo "== per device"
    nvidia-smi --query-gpu=index,uuid,name,memory.total,compute_cap,driver_version,mig.mode.current --format=csv
    echo "== summary"; nvidia-smi
    echo "== device nodes"; ls -l /dev/nvidia* || true
    echo "== driver libraries (ldconfig -p)"; ldconfig -p | grep -E 'libcuda|libnvidia-ml' || true
  } >"$out/gpu-host.txt" 2>&1
  cat "$out/gpu-host.txt"
  cuda_check_source >"$dir/cuda-check.cu"
  status_nvcc=0
  "$nvcc" --version >"$out/nvcc.txt" 2>&1 || true
  "$nvcc" -O2 -o "$dir/cuda-check" "$dir/cuda-check.cu" >>"$out/nvcc.txt" 2>&1 || status_nvcc=$?
  if [ "$status_nvcc" = 0 ]; then
    echo "== the CUDA program on the host" >>"$out/nvcc.txt"
    "$dir/cuda-check" >>"$out/nvcc.txt" 2>&1 || status_nvcc=$?
  fi
  cat "$out/nvcc.txt"
  want=$(cat "$dir/outpost-path")
  mkdir -p "$(dirname "$want")"
  install -m 0755 "$dir/outpost" "$want"
  status_gpu=0
  if [ "$status_nvcc" = 0 ]; then
    OUTPOST_TEST_CUDA_PROGRAM="$PWD/$dir/cuda-check" \
      "$dir/gpu-tests" --ignored --nocapture --test-threads 1 2>&1 | tee "$out/gpu-tests.txt" ||
      status_gpu=$?
  else
    status_gpu=$status_nvcc
  fi
  status_sandbox=0
  OUT=$out scripts/device-sandbox.sh run >/dev/null 2>&1 || status_sandbox=$?
  tail -n 5 "$out/sandbox-tests.txt" 2>/dev/null || true
  {
    echo "nvcc (build, and the run on the host): $status_nvcc"
    echo "gpu tests: $status_gpu"
    echo "sandbox suite: $status_sandbox"
  } | tee "$out/summary.txt"
  [ "$status_nvcc" = 0 ] && [ "$status_gpu" = 0 ] && [ "$status_sandbox" = 0 ]
  ;;
*)
  echo "usage: $0 prepare|run" >&2
  exit 2
  ;;
esac
