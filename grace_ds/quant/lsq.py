"""Group-wise LSQ fake quantisation of a linear weight (grace-method.md section 4).

A weight (out, in) is viewed as (out * in / g, g) contiguous groups along the input dimension,
row-major, so group k covers row k // (in/g), columns (k % (in/g)) * g ... + g. Each group has one
learnable theta = ln(s):

    q = clamp(round(W / s), q_n, q_p),   W_hat = s * q,   q_n = -2^(b-1), q_p = 2^(b-1) - 1

The gradient is LSQ's (Esser et al., ICLR 2020, eq. 3) with the straight-through estimator for
round: with x = W / s,
    dW_hat/dW = 1 if q_n <= x <= q_p else 0
    dW_hat/ds = round(x) - x if q_n <= x <= q_p, else q_n or q_p (the clamp it hit)
and dW_hat/dtheta = s * dW_hat/ds. "Inside" is decided on x before rounding, as in LSQ's
reference code (clamp, then round): for x in (q_p, q_p + 0.5) the value is q_p either way, the
gradient is the clamp branch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from grace_ds.quant.config import check_bits_group, qmin_qmax

# A group whose max |W| is below this (all-zero rows: pruned/padded units) would give a zero
# scale, ln(0) = -inf and NaN from 0/0 in the forward. Its grid is built for max|W| = 1e-8
# instead: the weights still quantise to (almost exactly) 0, theta stays finite (about -21.6 for
# INT4), and the LSQ gradient can grow the scale if the weights ever become non-zero.
MIN_GROUP_AMAX = 1e-8

# init_log_scale works on chunks of about this many weights (fp32: 64 MiB per temporary), so a
# 28672 x 8192 MLP weight is searched without a (groups, 20, g) tensor.
INIT_CHUNK_NUMEL = 1 << 24


def effective_group_size(in_features: int, group_size: int) -> int:
    """group_size if it divides in_features, else in_features (one group per row)."""
    return group_size if in_features % group_size == 0 else in_features


def _check_weight(weight: Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D linear weight (out, in), got shape {tuple(weight.shape)}; "
                         f"under ZeRO-3 gather the parameter first (deepspeed.zero.GatheredParameters)")
    if weight.numel() == 0:
        raise ValueError(f"weight of shape {tuple(weight.shape)} is empty: a ZeRO-3 partition? "
                         f"gather it first (deepspeed.zero.GatheredParameters)")
    if not weight.is_floating_point():
        raise ValueError(f"weight dtype {weight.dtype} is not floating point")


def _compute_dtype(weight: Tensor) -> torch.dtype:
    # fp32 for 16-bit and fp32 weights (the contract); float64 inputs stay float64 so that
    # gradcheck and float64 references can be run against the same code.
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


@torch.no_grad()
def init_log_scale(weight: Tensor, bits: int = 4, group_size: int = 128, *, candidates: int = 20,
                   init_range: tuple[float, float] = (0.3, 1.2)) -> Tensor:
    """Grid-search initial theta = ln(s), one per group, flat fp32 (n_groups,), row-major over (out, in).

    Per group, candidates linspace(lo, hi, candidates) * max|W| / q_p; the one with the least
    sum (W - W_hat)^2 wins (the first on ties). Needs the FULL weight (gather it under ZeRO-3).
    """
    check_bits_group(bits, group_size)
    _check_weight(weight)
    if candidates < 1:
        raise ValueError(f"candidates={candidates!r} must be >= 1")
    qn, qp = qmin_qmax(bits)
    g = effective_group_size(weight.shape[1], group_size)
    groups = weight.detach().reshape(-1, g)
    mults = torch.linspace(float(init_range[0]), float(init_range[1]), candidates, dtype=torch.float64).tolist()
    out = torch.empty(groups.shape[0], dtype=torch.float32, device=weight.device)
    rows = max(1, INIT_CHUNK_NUMEL // g)
    for start in range(0, groups.shape[0], rows):
        w = groups[start:start + rows].float()
        base = w.abs().amax(dim=1).clamp_min_(MIN_GROUP_AMAX).div_(qp)
        best_err = torch.full_like(base, float("inf"))
        best_scale = base.clone()
        for m in mults:
            s = base * m
            err = (w / s[:, None]).round_().clamp_(qn, qp).mul_(s[:, None]).sub_(w).square_().sum(dim=1)
            better = err < best_err          # strict: the first candidate wins a tie
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, s, best_scale)
        out[start:start + rows] = best_scale.log()
    return out


def quantize_codes(weight: Tensor, log_scale: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(q, s, x) in the compute dtype: codes as floats (n_groups, g), scales (n_groups,), x = W/s.

    export_int_weights and fake_quantize's backward use it; fake_quantize's forward runs the same
    ops in the same order in place. That is what makes export bit-exact (W_hat = q * s is one fp32
    multiply in both); tests/test_quant.py checks it with torch.equal.
    """
    qn, qp = qmin_qmax(bits)
    g = effective_group_size(weight.shape[1], group_size)
    dtype = _compute_dtype(weight)
    s = log_scale.reshape(-1).to(dtype).exp()
    x = weight.reshape(-1, g).to(dtype) / s[:, None]
    q = x.round().clamp_(qn, qp)
    return q, s, x


class _LSQFakeQuant(torch.autograd.Function):
    """Saves only its inputs (the weight Parameter and theta) and recomputes x in backward: the
    detach-trick version would keep ~4 fp32 copies of every weight alive until backward. The
    arithmetic is quantize_codes' (same ops, same order: bit-identical), done in place to hold one
    fp32 temporary per weight in forward and two in backward."""

    @staticmethod
    def forward(ctx, weight, log_scale, bits, group_size):
        qn, qp = qmin_qmax(bits)
        g = effective_group_size(weight.shape[1], group_size)
        dtype = _compute_dtype(weight)
        s = log_scale.reshape(-1).to(dtype).exp()[:, None]
        # weight (bf16/fp32) / s (fp32) promotes to fp32 exactly: no separate upcast copy
        w_hat = weight.reshape(-1, g).div(s).round_().clamp_(qn, qp).mul_(s)
        ctx.save_for_backward(weight, log_scale)
        ctx.bits, ctx.group_size = bits, group_size
        return w_hat.reshape(weight.shape).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_out, *_):
        weight, log_scale = ctx.saved_tensors
        qn, qp = qmin_qmax(ctx.bits)
        g = effective_group_size(weight.shape[1], ctx.group_size)
        dtype = _compute_dtype(weight)
        s = log_scale.reshape(-1).to(dtype).exp()[:, None]
        x = weight.reshape(-1, g).div(s)
        inside = (x >= qn) & (x <= qp)
        go = grad_out.reshape(x.shape)
        grad_w = grad_theta = None
        if ctx.needs_input_grad[0]:
            grad_w = go.masked_fill(~inside, 0).reshape(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[1]:
            # dW_hat/ds = clamp(round(x)) - x * inside: round(x) - x inside, q_n / q_p at the clamps
            d = x.round().clamp_(qn, qp).sub_(x.mul_(inside))
            grad_s = d.mul_(go).sum(dim=1)
            grad_theta = (grad_s * s[:, 0]).reshape(log_scale.shape).to(log_scale.dtype)
        return grad_w, grad_theta, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times a constant: LSQ's gradient scale on theta."""

    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def fake_quantize(weight: Tensor, log_scale: Tensor, bits: int = 4, group_size: int = 128, *,
                  lsq_grad_scale: bool = False,
                  log_scale_clamp: tuple[float, float] | None = None) -> Tensor:
    """W_hat = s * clamp(round(W / s), q_n, q_p), s = exp(theta) per group; same shape/dtype as weight.

    Math in fp32 (float64 for float64 weights). Gradients: LSQ with the straight-through round, to
    both weight and log_scale. lsq_grad_scale multiplies theta's gradient by 1/sqrt(g * q_p)
    (LSQ's gradient scale; the authors' LLaVA variant). log_scale_clamp=(lo, hi) clamps theta in
    the forward (torch.clamp: theta's gradient is 0 while it sits outside [lo, hi]).
    """
    check_bits_group(bits, group_size)
    _check_weight(weight)
    g = effective_group_size(weight.shape[1], group_size)
    n_groups = weight.numel() // g
    if log_scale.numel() != n_groups:
        raise ValueError(f"log_scale has {log_scale.numel()} entries, weight {tuple(weight.shape)} with "
                         f"group_size={group_size} (effective {g}) has {n_groups} groups; "
                         f"build it with init_log_scale(weight, bits, group_size)")
    if log_scale_clamp is not None:
        log_scale = log_scale.clamp(float(log_scale_clamp[0]), float(log_scale_clamp[1]))
    if lsq_grad_scale:
        log_scale = _ScaleGrad.apply(log_scale, 1.0 / (g * qmin_qmax(bits)[1]) ** 0.5)
    return _LSQFakeQuant.apply(weight, log_scale, bits, group_size)
