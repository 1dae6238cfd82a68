"""Confidence-gated decoupled KD (GRACE section 1) on materialised logits.

The per-token math (`token_kd_terms`) is shared with the fused loss (`fused.py`) so both paths
compute the same numbers by construction; `gated_dkd_loss` is the plain entry point for callers
that already hold (B, S, V) logits (offline teacher cache, tests, the non-fused objective).

Memory: tokens are processed in chunks by a custom autograd Function that keeps no activations
between forward and backward (it recomputes each chunk in backward), so the extra memory is
O(chunk x V) on top of the inputs and the (unavoidable) gradient of the student logits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

# Probabilities are clamped here before every log (grace-method.md, "Numerics"). The clamp is part
# of the method as the authors ran it: it caps the penalty (and zeroes the gradient) for tokens the
# student gives < 1e-8, so it changes values and is kept identical in every path and reference.
PROB_CLAMP = 1e-8

KD_MODES = ("gdkd", "kl")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for 16/32-bit inputs; float64 inputs stay float64 (gradcheck, references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# log(max(p, eps)) == max(log p, log eps): the clamp is applied to log-probabilities from
# log_softmax, which is the same function (value and gradient) with one less (n x V) temporary
# and no log(0).
LOG_CLAMP = math.log(PROB_CLAMP)


def _xlogx_ratio(p: Tensor, q: Tensor) -> Tensor:
    """sum_v p * (log p - log q) with both clamped at PROB_CLAMP; p == 0 terms vanish exactly."""
    return (p * (p.clamp_min(PROB_CLAMP).log() - q.clamp_min(PROB_CLAMP).log())).sum(-1)


def teacher_entropy(teacher_logits: Tensor) -> Tensor:
    """Entropy H_i of the teacher softmax at T = 1, per row (the gate's input). No gradient."""
    with torch.no_grad():
        lp = torch.log_softmax(teacher_logits, dim=-1)
        p = lp.exp()
        return -torch.linalg.vecdot(p, lp.clamp_min_(LOG_CLAMP))


def entropy_gate(entropy: Tensor, vocab_size: int) -> Tensor:
    """g_i = exp(-H_i / log|V|) in [1/e, 1] (section 1); a constant weight, never differentiated."""
    return torch.exp(-entropy.detach() / math.log(vocab_size))


def _kl_to_student(teacher_scaled: Tensor, student_scaled: Tensor) -> Tensor:
    """KL(softmax(teacher) || softmax(student)) per row, probabilities clamped at PROB_CLAMP.

    The teacher side is a constant: sum p_t log p_t is reduced under no_grad, so autograd only keeps
    the student's log-probabilities (one (n x V) tensor) and the teacher's probabilities.
    """
    with torch.no_grad():
        lpt = torch.log_softmax(teacher_scaled, -1)
        pt = lpt.exp()
        neg_ent = torch.linalg.vecdot(pt, lpt.clamp_min_(LOG_CLAMP))
        del lpt
    lps = torch.log_softmax(student_scaled, -1).clamp_min(LOG_CLAMP)
    return neg_ent - torch.linalg.vecdot(pt, lps)


def token_kd_terms(
    student: Tensor,
    teacher: Tensor,
    target: Tensor,
    *,
    temperature: float,
    alpha: float,
    beta_dkd: float,
    kd_mode: str,
) -> Tensor:
    """Per-token KD loss for rows of logits (n, V) in the compute dtype; target (n,) in [0, V).

    gdkd: DKD_i = (alpha * TCKD_i + beta_dkd * NCKD_i) * T^2 (section 1).
    kl:   KL(p_T || p_S) at T, times T^2 (the study's "naive KD" baseline).
    Gradient flows to `student` only; `teacher` is detached.
    """
    s_t = student / temperature
    t_t = teacher.detach() / temperature
    if kd_mode == "kl":
        return _kl_to_student(t_t, s_t) * temperature**2
    idx = target.unsqueeze(1)
    # TCKD: binary KL between [p(y), 1 - p(y)] of teacher and student (p(y) from the logsumexp, so no
    # full softmax is kept for it).
    ps_y = torch.exp(s_t.gather(1, idx).squeeze(1) - torch.logsumexp(s_t, -1))
    with torch.no_grad():
        pt_y = torch.exp(t_t.gather(1, idx).squeeze(1) - torch.logsumexp(t_t, -1))
    tckd = _xlogx_ratio(torch.stack([pt_y, 1.0 - pt_y], -1), torch.stack([ps_y, 1.0 - ps_y], -1))
    # NCKD: distributions over v != y, renormalised. Masking the target logit with the dtype minimum
    # (not -1000 as in the original DKD code) makes its probability exactly 0 for any logit scale.
    neg = torch.finfo(s_t.dtype).min
    mask = torch.zeros_like(s_t, dtype=torch.bool).scatter_(1, idx, True)
    nckd = _kl_to_student(t_t.masked_fill(mask, neg), s_t.masked_fill(mask, neg))
    return (alpha * tckd + beta_dkd * nckd) * temperature**2


class KDOptions(NamedTuple):
    temperature: float
    alpha: float
    beta_dkd: float
    kd_mode: str
    gate: bool
    chunk_size: int


def check_kd_options(temperature, alpha, beta_dkd, kd_mode, chunk_size) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r}: must be a finite number > 0 (GRACE default 2.0)")
    for name, v in (("alpha", alpha), ("beta_dkd", beta_dkd)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name}={v!r}: must be a finite number >= 0 (defaults alpha 1.0, beta_dkd 4.0)")
    if kd_mode not in KD_MODES:
        raise ValueError(f"kd_mode={kd_mode!r}: use one of {KD_MODES}")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size={chunk_size!r}: must be an int >= 1 (tokens per chunk, default 1024)")


def shifted_targets(labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Next-token shift exactly like HF's causal-LM CE: position s predicts labels[:, s + 1].

    Returns (flat row indices into the (B*S) positions that are supervised, their targets).
    Working on flat (B*S) positions avoids copying the non-contiguous logits[:, :-1].
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be (B, S), got shape {tuple(labels.shape)}")
    tgt = torch.full_like(labels, ignore_index)
    tgt[:, :-1] = labels[:, 1:]
    tgt = tgt.reshape(-1)
    rows = (tgt != ignore_index).nonzero().squeeze(1)
    return rows, tgt.index_select(0, rows)


def check_targets(target: Tensor, vocab: int, what: str) -> None:
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= vocab):
        bad = int(target.max()) if int(target.max()) >= vocab else int(target.min())
        raise ValueError(
            f"label {bad} is outside the {what} vocabulary [0, {vocab}): labels must be token ids "
            f"or ignore_index; pass vocab_size= the shared real vocabulary of teacher and student"
        )


class _ChunkedKD(torch.autograd.Function):
    """sum_i g_i DKD_i / sum_i g_i over supervised tokens, chunked, recomputed in backward."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, rows, target, opts: KDOptions):
        V = student_logits.shape[-1]
        cdt = compute_dtype(student_logits.dtype)
        s_flat = student_logits.reshape(-1, V)
        t_flat = teacher_logits.detach().reshape(-1, V)
        n = rows.numel()
        gates = torch.empty(n, dtype=cdt, device=student_logits.device)
        ents = torch.empty(n, dtype=cdt, device=student_logits.device)
        wsum = torch.zeros((), dtype=cdt, device=student_logits.device)
        for a in range(0, n, opts.chunk_size):
            r = rows[a : a + opts.chunk_size]
            s = s_flat.index_select(0, r).to(cdt)
            t = t_flat.index_select(0, r).to(cdt)
            ents[a : a + r.numel()] = teacher_entropy(t)
            g = entropy_gate(ents[a : a + r.numel()], V) if opts.gate else torch.ones_like(ents[a : a + r.numel()])
            gates[a : a + r.numel()] = g
            kd = token_kd_terms(s, t, target[a : a + r.numel()], temperature=opts.temperature, alpha=opts.alpha,
                                beta_dkd=opts.beta_dkd, kd_mode=opts.kd_mode)
            wsum += (g * kd).sum()
        gsum = gates.sum()
        ctx.s_flat, ctx.t_flat, ctx.shape, ctx.opts = s_flat, t_flat, student_logits.shape, opts
        ctx.save_for_backward(rows, target, gates, gsum)
        loss = wsum / gsum
        gate_mean, ent_mean = gates.mean(), ents.mean()
        ctx.mark_non_differentiable(gate_mean, ent_mean)
        return loss.to(cdt), gate_mean, ent_mean

    @staticmethod
    def backward(ctx, grad_loss, _g1, _g2):
        rows, target, gates, gsum = ctx.saved_tensors
        s_flat, t_flat, opts = ctx.s_flat, ctx.t_flat, ctx.opts
        cdt = compute_dtype(s_flat.dtype)
        grad = torch.zeros_like(s_flat)
        scale = grad_loss / gsum
        for a in range(0, rows.numel(), opts.chunk_size):
            r = rows[a : a + opts.chunk_size]
            sl = slice(a, a + r.numel())
            with torch.enable_grad():
                s = s_flat.index_select(0, r).detach().to(cdt).requires_grad_(True)
                t = t_flat.index_select(0, r).to(cdt)
                kd = token_kd_terms(s, t, target[sl], temperature=opts.temperature, alpha=opts.alpha,
                                    beta_dkd=opts.beta_dkd, kd_mode=opts.kd_mode)
                (gs,) = torch.autograd.grad((gates[sl] * kd).sum() * scale, s)
            grad.index_copy_(0, r, gs.to(grad.dtype))
        return grad.view(ctx.shape), None, None, None, None


def empty_loss_like(t: Tensor) -> Tensor:
    """An exact 0 that is still part of t's graph: the sum of an empty slice (0 * t.sum() would turn
    an inf/nan anywhere in t into nan). Used when a batch has no supervised tokens."""
    return t.reshape(-1)[:0].sum().to(compute_dtype(t.dtype))


def kd_loss_with_stats(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 2.0,
    alpha: float = 1.0,
    beta_dkd: float = 4.0,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    kd_mode: str = "gdkd",
    gate: bool = True,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Gated KD on materialised logits plus its statistics: (loss, gate_mean, entropy_mean, n_tokens).

    kd_mode "gdkd" is GRACE's gated DKD; "kl" the token KL baseline; gate=False weights tokens
    uniformly. With no supervised token the loss is an exact, differentiable 0 and the stats are 0.
    """
    check_kd_options(temperature, alpha, beta_dkd, kd_mode, chunk_size)
    if student_logits.dim() != 3 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            f"must both be (B, S, V) with the same V: slice both to the shared vocabulary first ([..., :vocab_size])"
        )
    if labels.shape != student_logits.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must be (B, S) = {tuple(student_logits.shape[:2])}")
    rows, target = shifted_targets(labels.to(student_logits.device), ignore_index)
    check_targets(target, student_logits.shape[-1], "distillation")
    if rows.numel() == 0:
        z = torch.zeros((), dtype=compute_dtype(student_logits.dtype), device=student_logits.device)
        return empty_loss_like(student_logits), z, z.clone(), 0
    opts = KDOptions(float(temperature), float(alpha), float(beta_dkd), kd_mode, bool(gate), chunk_size)
    loss, gate_mean, ent_mean = _ChunkedKD.apply(student_logits, teacher_logits, rows, target, opts)
    return loss, gate_mean, ent_mean, int(rows.numel())


def gated_dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 2.0,
    alpha: float = 1.0,
    beta_dkd: float = 4.0,
    ignore_index: int = -100,
    chunk_size: int = 1024,
) -> Tensor:
    """L_GDKD = sum_i g_i DKD_i / sum_i g_i over supervised tokens (grace-method.md section 1).

    student_logits, teacher_logits: (B, S, V), same V (slice to the shared vocabulary first);
    labels: (B, S) with ignore_index on unsupervised positions. The next-token shift is done here
    (logits[:, :-1] are scored against labels[:, 1:]), math is fp32 (fp64 for fp64 inputs), the gate
    is a constant from the T = 1 teacher entropy, the teacher receives no gradient.
    Zero supervised tokens -> an exact 0 that is still differentiable (backward gives zero grads).
    """
    return kd_loss_with_stats(student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha,
                              beta_dkd=beta_dkd, ignore_index=ignore_index, chunk_size=chunk_size)[0]
