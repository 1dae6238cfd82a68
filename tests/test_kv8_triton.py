"""The Triton decode attention over the int8 KV cache (grace_ds/export/kv8_triton.py) against a
float64 reference: on the CPU through Triton's interpreter (in a subprocess, since TRITON_INTERPRET
must be set before Triton compiles anything), and on the GPU for real."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# (B, H, Hk, L, D, mask kind, valid length): MHA (LLaVA), GQA with 7 query heads per kv head
# (Qwen2-VL), a length that is not a multiple of the block, one split and many
CASES = [
    (2, 4, 4, 150, 64, "bool", 97),
    (3, 14, 2, 200, 128, "additive", 200),
    (1, 8, 1, 64, 32, None, 64),
    (4, 2, 2, 1000, 64, "bool", 613),
]


def _reference(q, k, v, bias, scaling):
    from grace_ds.export.kv8 import dequantize_kv

    H, Hk = q.shape[1], k.shape[1]
    kd = dequantize_kv(k, torch.float64).repeat_interleave(H // Hk, 1)
    vd = dequantize_kv(v, torch.float64).repeat_interleave(H // Hk, 1)
    s = q.double() @ kd.transpose(-1, -2) * scaling          # (B, H, 1, L)
    if bias is not None:
        s = s + bias.double()[:, None, None, :]
    return torch.softmax(s, -1) @ vd                          # (B, H, 1, D)


def check(device: str) -> float:
    """Every case: the kernel (and the attention function that dispatches to it) against the
    reference; returns the worst relative error."""
    from grace_ds.export.kv8 import kv8_attention_forward, quantize_kv
    from grace_ds.export.kv8_triton import available, kv8_decode_attention, n_splits_for

    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for B, H, Hk, L, D, kind, valid in CASES:
        q = torch.randn(B, H, 1, D, generator=g).to(device, torch.bfloat16)
        # scales varying over positions and heads, as in a real cache
        k = quantize_kv(torch.randn(B, Hk, L, D, generator=g) * torch.rand(B, Hk, L, 1, generator=g) * 4).to(device)
        v = quantize_kv(torch.randn(B, Hk, L, D, generator=g) * torch.rand(B, Hk, L, 1, generator=g) * 4).to(device)
        keep = torch.arange(L)[None, :] < torch.tensor([valid - i * 3 for i in range(B)])[:, None]
        bias = mask = None
        if kind == "bool":
            mask = keep[:, None, None, :].to(device)
            bias = torch.where(keep, 0.0, float("-inf")).to(device)
        elif kind == "additive":
            bias = torch.where(keep, 0.0, float("-inf")).to(device) + torch.randn(B, L, generator=g).to(device) * 0.5
            mask = bias[:, None, None, :]
        scaling = D ** -0.5
        assert available(q)
        ref = _reference(q.cpu(), k.cpu(), v.cpu(), None if bias is None else bias.cpu(), scaling)
        out = kv8_decode_attention(q, k, v, bias, scaling)
        assert out.shape == (B, H, 1, D) and out.dtype == torch.float32
        err = ((out.cpu().double() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (B, H, Hk, L, D, kind, err)
        assert n_splits_for(B * Hk, L) >= 1
        module = torch.nn.Module()
        via, _ = kv8_attention_forward(module, q, k, v, mask, scaling=scaling)
        assert via.shape == (B, 1, H, D) and via.dtype == torch.bfloat16
        err2 = ((via.transpose(1, 2).cpu().double() - ref).norm() / ref.norm()).item()
        assert err2 < 1e-2, (B, H, Hk, L, D, kind, err2)
        worst = max(worst, err, err2)
    with pytest.raises(ValueError, match="one query token"):
        kv8_decode_attention(torch.zeros(1, 2, 3, 64, device=device, dtype=torch.bfloat16), k[:1, :1], v[:1, :1], None, 1.0)
    return worst


def test_kernel_matches_float64_reference_in_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "worst rel err" in r.stdout


def test_kernel_is_not_used_without_triton_or_a_gpu(monkeypatch):
    """On a CPU tensor (no interpreter) and with GRACE_KV8_TRITON=0 the portable attention runs."""
    from grace_ds.export import kv8_triton

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kv8_triton.available(torch.zeros(1))
    monkeypatch.setenv("GRACE_KV8_TRITON", "0")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not kv8_triton.available(torch.zeros(1))


@pytest.mark.gpu
def test_gpu_kernel_matches_float64_reference():
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    check("cuda")


if __name__ == "__main__":   # the interpreter run (TRITON_INTERPRET=1 set by the test above)
    print(f"worst rel err {check('cpu'):.2e}")
