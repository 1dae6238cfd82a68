"""fused_gdkd_ce: same values and gradients as the plain path (materialised logits + gated_dkd_loss +
F.cross_entropy) and as the float64 references of test_distill.py, on odd chunk boundaries,
different padded vocabularies, biases, separate weighting of CE and GDKD, and edge cases."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_distill import make_labels, ref_ce, ref_gdkd, rel_err

from grace_ds.distill import fused_gdkd_ce, gated_dkd_loss
from grace_ds.distill.gdkd import kd_loss_with_stats


def _inputs(seed, B=2, S=17, Hs=24, Ht=40, Vs=3008, Vt=3072, V=3000, dtype=torch.float32, bias=False):
    gen = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, S, Hs, generator=gen, dtype=dtype).requires_grad_(True)
    ws = (torch.randn(Vs, Hs, generator=gen, dtype=dtype) * 0.4).requires_grad_(True)
    ht = torch.randn(B, S, Ht, generator=gen, dtype=dtype)
    wt = torch.randn(Vt, Ht, generator=gen, dtype=dtype) * 0.4
    bs = (torch.randn(Vs, generator=gen, dtype=dtype) * 0.1).requires_grad_(True) if bias else None
    bt = torch.randn(Vt, generator=gen, dtype=dtype) * 0.1 if bias else None
    labels = make_labels(B, S, V, gen)
    return hs, ws, bs, ht, wt, bt, labels


def _plain(hs, ws, bs, ht, wt, bt, labels, V, kd_mode="gdkd", gate=True, **kw):
    """The materialising path the fused loss must equal."""
    ls = F.linear(hs, ws, bs)
    lt = F.linear(ht, wt, bt)
    ce = F.cross_entropy(ls[:, :-1].reshape(-1, ls.shape[-1]).float(), labels[:, 1:].reshape(-1))
    kd = kd_loss_with_stats(ls[..., :V], lt[..., :V], labels, kd_mode=kd_mode, gate=gate, **kw)[0]
    return ce, kd, ls, lt


@pytest.mark.parametrize("kd_mode,gate,bias,chunk", [("gdkd", True, False, 7), ("gdkd", True, True, 1024),
                                                     ("kl", False, False, 5), ("gdkd", False, True, 3)])
def test_fused_equals_plain_and_reference(kd_mode, gate, bias, chunk):
    hs, ws, bs, ht, wt, bt, labels = _inputs(11, bias=bias)
    a, b = 0.3, 1.7  # CE and GDKD weighted separately through one Function
    out = fused_gdkd_ce(hs, ws, ht, wt, labels, vocab_size=3000, chunk_size=chunk, kd_mode=kd_mode, gate=gate,
                        student_bias=bs, teacher_bias=bt, temperature=1.7)
    params = [p for p in (hs, ws, bs) if p is not None]
    gf = torch.autograd.grad(a * out.ce + b * out.gdkd, params)
    ce, kd, ls, lt = _plain(hs, ws, bs, ht, wt, bt, labels, 3000, kd_mode, gate, temperature=1.7)
    gp = torch.autograd.grad(a * ce + b * kd, params)
    assert out.n_tokens == int((labels[:, 1:] != -100).sum())
    assert rel_err(out.ce, ce) < 1e-5 and rel_err(out.gdkd, kd) < 1e-5
    for x, y in zip(gf, gp):
        assert rel_err(x, y) < 1e-5
    # float64 references (values, and gradients through the logits into hidden / weight).
    hs64, ws64 = hs.detach().double().requires_grad_(True), ws.detach().double().requires_grad_(True)
    bs64 = bs.detach().double().requires_grad_(True) if bias else None
    ls64 = F.linear(hs64, ws64, bs64)
    lt64 = F.linear(ht.double(), wt.double(), bt.double() if bias else None)
    rk, rg, rh = ref_gdkd(ls64[..., :3000], lt64[..., :3000], labels, T=1.7, mode=kd_mode, gate=gate)
    rce = ref_ce(ls64, labels)
    assert rel_err(out.ce, rce) < 1e-5 and rel_err(out.gdkd, rk) < 1e-5
    assert abs(out.gate_mean.item() - rg.item()) < 1e-6 and abs(out.teacher_entropy_mean.item() - rh.item()) < 1e-5
    gr = torch.autograd.grad(a * rce + b * rk, [p for p in (hs64, ws64, bs64) if p is not None])
    for x, y in zip(gf, gr):
        assert rel_err(x, y) < 1e-5


def test_fused_gradcheck_double_both_outputs():
    hs, ws, bs, ht, wt, bt, labels = _inputs(12, B=2, S=5, Hs=4, Ht=3, Vs=9, Vt=11, V=8, dtype=torch.float64,
                                             bias=True)

    def f(h, w, b):
        o = fused_gdkd_ce(h, w, ht, wt, labels, student_bias=b, teacher_bias=bt, chunk_size=3, vocab_size=8)
        return o.ce, o.gdkd

    assert torch.autograd.gradcheck(f, (hs, ws, bs))


def test_fused_default_vocab_is_min_and_ce_only_when_gdkd_unused():
    hs, ws, bs, ht, wt, bt, labels = _inputs(13, Vs=3008, Vt=3001, V=3000)
    out = fused_gdkd_ce(hs, ws, ht, wt, labels, chunk_size=9)
    ce, kd, _, _ = _plain(hs, ws, bs, ht, wt, bt, labels, 3001)
    assert rel_err(out.gdkd, kd) < 1e-5
    # Only ce in the loss: the gdkd branch is skipped in backward and grads equal plain CE grads.
    gf = torch.autograd.grad(out.ce, [hs, ws])
    gp = torch.autograd.grad(ce, [hs, ws])
    assert all(rel_err(x, y) < 1e-5 for x, y in zip(gf, gp))
    # Without a teacher: CE only, gdkd an exact 0.
    out2 = fused_gdkd_ce(hs, ws, None, None, labels, chunk_size=9)
    assert out2.gdkd.item() == 0.0 and rel_err(out2.ce, ce) < 1e-6 and out2.gate_mean.item() == 0.0


def test_fused_teacher_gets_no_grad_and_empty_batch_is_differentiable_zero():
    hs, ws, bs, ht, wt, bt, labels = _inputs(14, Vs=100, Vt=100, V=100)
    ht.requires_grad_(True)
    wt.requires_grad_(True)
    out = fused_gdkd_ce(hs, ws, ht, wt, labels)
    (out.ce + out.gdkd).backward()
    assert ht.grad is None and wt.grad is None and ws.grad.abs().max() > 0
    hs.grad = ws.grad = None
    none = torch.full_like(labels, -100)
    out = fused_gdkd_ce(hs, ws, ht, wt, none)
    assert (out.ce.item(), out.gdkd.item(), out.n_tokens) == (0.0, 0.0, 0)
    (out.ce + out.gdkd).backward()
    assert hs.grad.abs().max() == 0 and ws.grad.abs().max() == 0


def test_fused_student_equals_teacher_gives_zero_kd_and_gate_bounds():
    hs, ws, _, _, _, _, labels = _inputs(15, Vs=500, V=500)
    out = fused_gdkd_ce(hs, ws, hs.detach(), ws.detach(), labels, chunk_size=4)
    assert abs(out.gdkd.item()) < 1e-6
    assert math.exp(-1) <= out.gate_mean.item() <= 1.0
    out_u = fused_gdkd_ce(hs, ws, hs.detach(), torch.zeros_like(ws), labels)  # uniform teacher
    assert abs(out_u.gate_mean.item() - math.exp(-1)) < 1e-6


def test_fused_bf16_matches_plain_bf16():
    # The fused path must reproduce `lm_head(hidden).float()` of a bf16 model, not an fp32 matmul.
    hs, ws, bs, ht, wt, bt, labels = _inputs(16, Vs=512, Vt=520, V=500, dtype=torch.bfloat16)
    out = fused_gdkd_ce(hs, ws, ht, wt, labels, vocab_size=500, chunk_size=6)
    assert out.ce.dtype == torch.float32
    gf = torch.autograd.grad(out.ce + out.gdkd, [hs, ws])
    ce, kd, _, _ = _plain(hs, ws, bs, ht, wt, bt, labels, 500)
    gp = torch.autograd.grad(ce + kd, [hs, ws])
    assert rel_err(out.ce, ce) < 1e-5 and rel_err(out.gdkd, kd) < 1e-5
    assert gf[0].dtype == gf[1].dtype == torch.bfloat16
    assert all(rel_err(x, y) < 2e-2 for x, y in zip(gf, gp))  # bf16 rounding of different summation orders


def test_fused_bad_inputs_name_the_fix():
    hs, ws, bs, ht, wt, bt, labels = _inputs(17, Vs=64, Vt=80, V=60)
    shard = torch.nn.Parameter(torch.empty(0))
    shard.ds_id, shard.ds_shape = 0, torch.Size([64, 24])  # what ZeRO-3 leaves outside the owner's forward
    with pytest.raises(ValueError, match="register_head_for_loss"):
        fused_gdkd_ce(hs, shard, ht, wt, labels)
    with pytest.raises(ValueError, match="vocab_size=70"):
        fused_gdkd_ce(hs, ws, ht, wt, labels, vocab_size=70)
    with pytest.raises(ValueError, match="label 63"):
        fused_gdkd_ce(hs, ws, ht, wt, torch.full_like(labels, 63), vocab_size=60)
    with pytest.raises(ValueError, match="in_features"):
        fused_gdkd_ce(hs, ws, ht[..., :5], wt, labels)
    with pytest.raises(ValueError, match="kd_mode"):
        fused_gdkd_ce(hs, ws, ht, wt, labels, kd_mode="dkd")
    with pytest.raises(ValueError, match="both teacher_hidden and teacher_weight"):
        fused_gdkd_ce(hs, ws, ht, None, labels)


def test_plain_gated_dkd_public_signature_is_the_fused_gdkd():
    # gated_dkd_loss (public) and the fused gdkd agree for the default knobs.
    hs, ws, bs, ht, wt, bt, labels = _inputs(18, Vs=300, Vt=300, V=300)
    out = fused_gdkd_ce(hs, ws, ht, wt, labels)
    assert rel_err(out.gdkd, gated_dkd_loss(F.linear(hs, ws), F.linear(ht, wt), labels)) < 1e-5


@pytest.mark.gpu
def test_fused_equals_plain_on_cuda():
    # Same comparison on the GPU path (cuBLAS matmuls, CUDA softmax kernels), fp32 and bf16.
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        cpu = _inputs(19, S=33, Vs=4104, Vt=4160, V=4100, dtype=dtype, bias=True)
        hs, ws, bs, ht, wt, bt, labels = [
            (x.detach().cuda().requires_grad_(x.requires_grad) if x is not None else None) for x in cpu]
        out = fused_gdkd_ce(hs, ws, ht, wt, labels, vocab_size=4100, chunk_size=13, student_bias=bs, teacher_bias=bt)
        gf = torch.autograd.grad(out.ce + 2.0 * out.gdkd, [hs, ws, bs])
        ce, kd, _, _ = _plain(hs, ws, bs, ht, wt, bt, labels, 4100)
        gp = torch.autograd.grad(ce + 2.0 * kd, [hs, ws, bs])
        assert rel_err(out.ce, ce) < 1e-5 and rel_err(out.gdkd, kd) < 1e-5
        assert all(rel_err(x, y) < tol for x, y in zip(gf, gp))
