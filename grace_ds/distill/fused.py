"""Fused student CE + gated DKD from final hidden states and lm_head weights.

Logits are formed chunk by chunk at supervised positions only (next-token shifted) and dropped
right after use; backward recomputes each chunk's logits. Neither model's (tokens x V) logits are
ever materialised for the sequence: with a 152K vocabulary that is ~0.6 MB per token in fp32.

Both scalars (CE and GDKD) come out of one autograd Function so the caller can weight them
freely (loss = ce + beta * gdkd): backward receives both upstream gradients and skips a term
whose gradient is None (e.g. a non-finite GDKD the objective left out of the loss).

ZeRO-3: `student_weight` must be the gathered lm_head weight. Call this inside the forward of a
module on which the weight is registered (`grace_ds.distill.zero3.register_head_for_loss`), so it
is gathered for that module's forward AND backward (this Function reads it again in backward).
An empty partition is detected and refused with an error that says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from grace_ds.distill.gdkd import (
    check_kd_options,
    check_targets,
    compute_dtype,
    entropy_gate,
    shifted_targets,
    teacher_entropy,
    token_kd_terms,
)


@dataclass
class FusedLossOutput:
    ce: Tensor                     # mean student CE over supervised tokens (full student vocab), differentiable
    gdkd: Tensor                   # gated KD on the shared vocab (0 without a teacher), differentiable
    gate_mean: Tensor              # mean gate over supervised tokens (1 with gate=False, 0 without teacher)
    teacher_entropy_mean: Tensor   # mean T = 1 teacher entropy in nats (0 without teacher)
    n_tokens: int                  # supervised tokens in this batch


class _Opts(NamedTuple):
    temperature: float
    alpha: float
    beta_dkd: float
    kd_mode: str
    gate: bool
    chunk_size: int
    vocab_size: int
    has_teacher: bool


def _check_weight(weight: Tensor, hidden: Tensor, who: str) -> None:
    if weight.dim() != 2 or weight.numel() == 0:
        full = getattr(weight, "ds_shape", None)
        hint = (
            f" It is a ZeRO-3 partition (full shape {tuple(full)}): call the loss inside the forward of a module "
            f"on which the weight is registered with grace_ds.distill.zero3.register_head_for_loss(module, weight)."
            if full is not None
            else ""
        )
        raise ValueError(f"{who} lm_head weight has shape {tuple(weight.shape)}, expected (V, H).{hint}")
    if hidden.dim() != 3 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{who} hidden {tuple(hidden.shape)} must be (B, S, H) with H = lm_head in_features {weight.shape[1]}"
        )


def _linear(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    # Same op and dtype as the model's own lm_head (F.linear in the weight dtype), then fp32 math:
    # the fused path reproduces `lm_head(hidden).float()` of the plain path.
    return F.linear(h, w, b)


class _FusedKDCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, rows, target, opts: _Opts):
        ctx.set_materialize_grads(False)
        cdt = compute_dtype(hs.dtype if hs.dtype == torch.float64 else ws.dtype)
        dev = hs.device
        n = rows.numel()
        hs_sel = hs.reshape(-1, hs.shape[-1]).index_select(0, rows)
        ht_sel = ht.reshape(-1, ht.shape[-1]).index_select(0, rows) if opts.has_teacher else None
        V = opts.vocab_size
        # Teacher rows beyond the shared vocabulary (padding) are never multiplied.
        wt_v = wt[:V] if opts.has_teacher else None
        bt_v = bt[:V] if bt is not None else None
        ce_sum = torch.zeros((), dtype=cdt, device=dev)
        wsum = torch.zeros((), dtype=cdt, device=dev)
        gates = torch.ones(n, dtype=cdt, device=dev)
        ents = torch.zeros(n, dtype=cdt, device=dev)
        for a in range(0, n, opts.chunk_size):
            sl = slice(a, min(a + opts.chunk_size, n))
            y = target[sl]
            s = _linear(hs_sel[sl], ws, bs).to(cdt)
            ce_sum += (torch.logsumexp(s, -1) - s.gather(1, y.unsqueeze(1)).squeeze(1)).sum()
            if opts.has_teacher:
                t = _linear(ht_sel[sl], wt_v, bt_v).to(cdt)
                ents[sl] = teacher_entropy(t)
                if opts.gate:
                    gates[sl] = entropy_gate(ents[sl], V)
                kd = token_kd_terms(s[:, :V], t, y, temperature=opts.temperature, alpha=opts.alpha,
                                    beta_dkd=opts.beta_dkd, kd_mode=opts.kd_mode)
                wsum += (gates[sl] * kd).sum()
        gsum = gates.sum()
        ctx.ws, ctx.bs, ctx.wt_v, ctx.bt_v, ctx.opts = ws, bs, wt_v, bt_v, opts
        ctx.hs_shape, ctx.hs_dtype = hs.shape, hs.dtype
        ctx.save_for_backward(hs_sel, ht_sel, rows, target, gates, gsum)
        if n == 0:
            ce = ce_sum.clone()
            gdkd = wsum.clone()
            gate_mean = torch.zeros((), dtype=cdt, device=dev)
            ent_mean = gate_mean.clone()
        else:
            ce = ce_sum / n
            gdkd = wsum / gsum if opts.has_teacher else wsum.clone()
            gate_mean = gates.mean() if opts.has_teacher else torch.zeros((), dtype=cdt, device=dev)
            ent_mean = ents.mean()
        ctx.mark_non_differentiable(gate_mean, ent_mean)
        return ce, gdkd, gate_mean, ent_mean

    @staticmethod
    def backward(ctx, g_ce, g_kd, _g1, _g2):
        hs_sel, ht_sel, rows, target, gates, gsum = ctx.saved_tensors
        ws, bs, wt_v, bt_v, opts = ctx.ws, ctx.bs, ctx.wt_v, ctx.bt_v, ctx.opts
        n = rows.numel()
        if not opts.has_teacher:
            g_kd = None
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if (g_ce is None and g_kd is None) or n == 0:
            # Nothing flows back (e.g. both terms excluded, or no supervised token): zero, not None,
            # for inputs that asked for a gradient so ZeRO-3's reduce hooks see a tensor on every rank.
            zeros = lambda t, need: torch.zeros_like(t) if (need and t is not None) else None  # noqa: E731
            grad_h = torch.zeros(ctx.hs_shape, dtype=ctx.hs_dtype, device=ws.device) if need_h else None
            return grad_h, zeros(ws, need_w), zeros(bs, need_b), None, None, None, None, None, None
        cdt = compute_dtype(ctx.hs_dtype if ctx.hs_dtype == torch.float64 else ws.dtype)
        V = opts.vocab_size
        H = hs_sel.shape[-1]
        # Accumulate dW / db over chunks in the compute dtype (fp32 for bf16 weights): the plain path
        # does this reduction inside one matmul with fp32 accumulation; adding bf16 partial sums
        # chunk by chunk would lose precision.
        grad_rows = torch.empty(n, H, dtype=ctx.hs_dtype, device=hs_sel.device) if need_h else None
        grad_w = torch.zeros(ws.shape, dtype=cdt, device=ws.device) if need_w else None
        grad_b = torch.zeros(bs.shape, dtype=cdt, device=bs.device) if (need_b and bs is not None) else None
        for a in range(0, n, opts.chunk_size):
            sl = slice(a, min(a + opts.chunk_size, n))
            y = target[sl]
            h = hs_sel[sl]
            with torch.no_grad():
                s_low = _linear(h, ws, bs)
                t = _linear(ht_sel[sl], wt_v, bt_v).to(cdt) if g_kd is not None else None
            with torch.enable_grad():
                s = s_low.to(cdt).requires_grad_(True)
                del s_low  # the (chunk x V_s) 16-bit copy is not needed past the cast
                total = s.new_zeros(())
                if g_ce is not None:
                    ce_tok = torch.logsumexp(s, -1) - s.gather(1, y.unsqueeze(1)).squeeze(1)
                    total = total + ce_tok.sum() * (g_ce / n)
                if g_kd is not None:
                    kd = token_kd_terms(s[:, :V], t, y, temperature=opts.temperature, alpha=opts.alpha,
                                        beta_dkd=opts.beta_dkd, kd_mode=opts.kd_mode)
                    total = total + (gates[sl] * kd).sum() * (g_kd / gsum)
                (ds,) = torch.autograd.grad(total, s)
            # d logits -> the weight dtype, as autograd does at the `.float()` cast of the plain path.
            ds = ds.to(ws.dtype)
            if need_h:
                grad_rows[sl] = (ds @ ws).to(ctx.hs_dtype)
            # In-place add of the 16-bit product into the fp32 buffer casts element-wise on load: no
            # fp32 (V x H) copy of each chunk's product is made.
            if need_w:
                grad_w += ds.t() @ h.to(ws.dtype)
            if grad_b is not None:
                grad_b += ds.sum(0)
        grad_h = None
        if need_h:
            grad_h = torch.zeros(ctx.hs_shape[0] * ctx.hs_shape[1], H, dtype=ctx.hs_dtype, device=hs_sel.device)
            grad_h.index_copy_(0, rows, grad_rows)
            grad_h = grad_h.view(ctx.hs_shape)
        grad_w = grad_w.to(ws.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bs.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def fused_gdkd_ce(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    labels: Tensor,
    *,
    temperature: float = 2.0,
    alpha: float = 1.0,
    beta_dkd: float = 4.0,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
    kd_mode: str = "gdkd",
    gate: bool = True,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
) -> FusedLossOutput:
    """Student CE and gated KD from hidden states, never materialising (tokens x V) logits.

    student_hidden (B, S, H_s) / teacher_hidden (B, S, H_t): final-norm outputs. student_weight
    (V_s, H_s) / teacher_weight (V_t, H_t): gathered lm_head weights. labels (B, S). The shift is
    done here: position s is scored against labels[:, s + 1].

    ce: mean token CE of the student on its full vocabulary V_s (== HF's shifted CE).
    gdkd: gated DKD (kd_mode "gdkd") or token KL(p_T || p_S) * T^2 (kd_mode "kl") on the shared
    vocabulary [:vocab_size] (default min(V_s, V_t): vocabularies padded to different sizes are
    sliced to the shared real vocabulary). gate=False weights tokens uniformly (ablation).
    teacher_hidden = teacher_weight = None: CE only (gdkd is an exact 0).
    The teacher receives no gradient. Zero supervised tokens: ce = gdkd = exact, differentiable 0.
    """
    check_kd_options(temperature, alpha, beta_dkd, kd_mode, chunk_size)
    _check_weight(student_weight, student_hidden, "student")
    Vs = student_weight.shape[0]
    has_teacher = teacher_hidden is not None or teacher_weight is not None
    if has_teacher:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("pass both teacher_hidden and teacher_weight (or neither, for CE only)")
        _check_weight(teacher_weight, teacher_hidden, "teacher")
        if teacher_hidden.shape[:2] != student_hidden.shape[:2]:
            raise ValueError(
                f"teacher hidden {tuple(teacher_hidden.shape)} and student hidden {tuple(student_hidden.shape)} "
                f"must share (B, S): both models must see the same token sequence"
            )
        Vt = teacher_weight.shape[0]
        V = min(Vs, Vt) if vocab_size is None else vocab_size
        if not (isinstance(V, int) and 1 < V <= min(Vs, Vt)):
            raise ValueError(
                f"vocab_size={vocab_size!r}: must be an int in (1, {min(Vs, Vt)}] (student vocab {Vs}, "
                f"teacher vocab {Vt}); use the shared real vocabulary of both tokenizers"
            )
    else:
        V = Vs
    for name, b, w in (("student_bias", student_bias, student_weight), ("teacher_bias", teacher_bias, teacher_weight)):
        if b is not None and (w is None or b.shape != w.shape[:1]):
            raise ValueError(f"{name} shape {tuple(b.shape)} must be ({None if w is None else w.shape[0]},)")
    if labels.shape != student_hidden.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must be (B, S) = {tuple(student_hidden.shape[:2])}")
    rows, target = shifted_targets(labels.to(student_hidden.device), ignore_index)
    check_targets(target, V, "shared" if has_teacher else "student")
    opts = _Opts(float(temperature), float(alpha), float(beta_dkd), kd_mode, bool(gate), chunk_size, V, has_teacher)
    if has_teacher:
        teacher_hidden = teacher_hidden.detach()
        teacher_weight = teacher_weight.detach()
        teacher_bias = teacher_bias.detach() if teacher_bias is not None else None
    ce, gdkd, gate_mean, ent_mean = _FusedKDCE.apply(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, rows, target, opts
    )
    return FusedLossOutput(ce=ce, gdkd=gdkd, gate_mean=gate_mean, teacher_entropy_mean=ent_mean,
                           n_tokens=int(rows.numel()))
