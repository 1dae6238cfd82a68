"""Small run for compute-sanitizer: every tensor-core config, the lean configs' GLU epilogue and RMSNorm fold,
the dequant path, the op (plain and GLU), and (on Hopper) every wgmma config with automatic and forced split-K, on
tiny odd shapes.
compute-sanitizer --tool memcheck python -m kernels.w4a16.memcheck"""
import torch

from .op import load_extension
from .pack import pack_weights


def main():
    ext = load_extension()
    torch.manual_seed(0)
    for (N, K) in [(48, 256), (16, 384), (32, 1152)]:
        codes = torch.randint(-8, 8, (N, K), dtype=torch.int8)
        scales = torch.rand(N, K // 128) * 0.01 + 0.005
        for dt in (torch.bfloat16, torch.float16):
            p = {k: v.cuda() for k, v in pack_weights(codes, scales, dtype=dt).items()}
            for M in (1, 3, 17, 65, 130):
                x = torch.randn(M, K, dtype=dt, device="cuda")
                for c in range(ext.num_configs):
                    ext.tc_gemm(x, p["qweight"], p["scales"], c)
                    if ext.first_sk <= c < ext.first_lean:  # forced split-K (atomics + workspace + finalize)
                        ext.tc_gemm(x, p["qweight"], p["scales"], c, 3)
                torch.ops.grace.w4a16_gemm(x, p["qweight"], p["scales"], 128)
                gamma = torch.rand(K, dtype=dt, device="cuda") + 0.5
                for c in range(ext.first_lean, ext.num_configs):   # the RMSNorm fold (NOTES.md v21), plain and GLU
                    for glu in (False, True):
                        if ext.lean_norm_ok(c, glu) and (not glu or N % 32 == 0):
                            ext.lean_norm_gemm(x, p["qweight"], p["scales"], gamma, 1e-6, c, glu)
                if N % 32 == 0:   # N = 2I: the GLU epilogue of every config with one, and the op's two paths
                    for c in range(ext.first_lean, ext.num_configs):
                        if ext.lean_glu_ok(c):
                            ext.lean_glu_gemm(x, p["qweight"], p["scales"], c)
                    torch.ops.grace.w4a16_gemm_glu(x, p["qweight"], p["scales"], 128)
            ext.dequant(p["qweight"], p["scales"])
    if torch.cuda.get_device_capability()[0] == 9:      # wgmma kernel: N % 64 == 0, partial token tiles
        for (N, K) in [(64, 256), (192, 1152)]:
            codes = torch.randint(-8, 8, (N, K), dtype=torch.int8)
            scales = torch.rand(N, K // 128) * 0.01 + 0.005
            for dt in (torch.bfloat16, torch.float16):
                p = {k: v.cuda() for k, v in pack_weights(codes, scales, dtype=dt).items()}
                for M in (1, 17, 33, 65, 130, 257):
                    x = torch.randn(M, K, dtype=dt, device="cuda")
                    for c in range(ext.num_wgmma_configs):
                        ext.wgmma_gemm(x, p["qweight"], p["scales"], c)
                        ext.wgmma_gemm(x, p["qweight"], p["scales"], c, 3)
                    torch.ops.grace.w4a16_gemm(x, p["qweight"], p["scales"], 128)
                    torch.ops.grace.w4a16_gemm_glu(x, p["qweight"], p["scales"], 128)   # + the activation kernel
    torch.cuda.synchronize()
    print("memcheck run done")


if __name__ == "__main__":
    main()
