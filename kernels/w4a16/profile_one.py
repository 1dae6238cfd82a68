"""Launches for an Nsight Compute look at the bottleneck (one launch each, after a warm-up):
    ncu -k regex:w4a16 --launch-skip 3 ... python -m kernels.w4a16.profile_one
28672x8192: sk config 35 (M=64, 1 split), sk config 39 (M=64), register-only config 9 (M=16)."""
import torch

from .op import load_extension
from .pack import pack_weights
from .bench import rand_weight


def main():
    ext = load_extension()
    N, K = 28672, 8192
    p = pack_weights(*rand_weight(N, K, "cuda"), dtype=torch.bfloat16)
    x64 = torch.randn(64, K, device="cuda", dtype=torch.bfloat16)
    x16 = torch.randn(16, K, device="cuda", dtype=torch.bfloat16)
    runs = [(x64, 35, 1), (x64, 39, 0), (x16, 9, 0)]
    for x, c, s in runs:  # warm-up (3 launches, skipped by --launch-skip 3)
        ext.tc_gemm(x, p["qweight"], p["scales"], c, s)
    torch.cuda.synchronize()
    for x, c, s in runs:
        ext.tc_gemm(x, p["qweight"], p["scales"], c, s)
    torch.cuda.synchronize()
    print("profile_one done")


if __name__ == "__main__":
    main()
