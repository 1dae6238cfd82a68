"""Relational CKA on visual tokens (GRACE section 2).

CKA compares n x n Gram matrices, so teacher and student widths may differ and an offline teacher
cache only needs the teacher's Gram (`cosine_gram`), never its hidden states (`cka_from_grams`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


MIN_TOKENS = 4           # images with fewer visual tokens are skipped (section 2)
DEGENERATE_NORM = 1e-8   # a centred Gram with a smaller Frobenius norm is skipped (section 2)


def cosine_gram(feats: Tensor) -> Tensor:
    """K = V V^T of the row-wise l2-normalised features (n, d) -> (n, n), in float64.

    float64 because the degeneracy test of section 2 is absolute (centred norm < 1e-8): in fp32 an
    exactly degenerate Gram (all tokens equal) keeps ~n * 1e-7 of round-off after centring and
    would pass as "usable", giving a CKA of pure noise. n x n x d in fp64 is cheap next to the LLM.
    """
    if feats.dim() != 2:
        raise ValueError(f"features must be (n, d), got shape {tuple(feats.shape)}")
    return _gram(feats)


# The helpers below work on one (n, n) matrix or a batch (..., n, n) of them (rcka_loss's batched path).

def _gram(feats: Tensor) -> Tensor:
    v = F.normalize(feats.to(torch.float64), dim=-1)
    return v @ v.transpose(-1, -2)


def _centre(k: Tensor) -> Tensor:
    # H K H with H = I - 11^T/n, written as row/column mean removal (no n x n H is built).
    return k - k.mean(-2, keepdim=True) - k.mean(-1, keepdim=True) + k.mean((-2, -1), keepdim=True)


def _cka_centred(kt: Tensor, ks: Tensor, usable: Tensor | None = None) -> Tensor:
    # HSIC(K, L) = tr(K~ L~) = sum(K~ * L~) for symmetric K~, L~; the 1/(n-1)^2 factor cancels in the ratio.
    hts = (kt * ks).sum((-2, -1))
    prod = (kt * kt).sum((-2, -1)) * (ks * ks).sum((-2, -1))
    if usable is not None:
        # batched: skipped (degenerate) matrices have prod ~0, where sqrt's gradient is inf; their zero
        # weight in the mean would become 0 * inf = nan in the backward pass. Give them a safe value.
        prod = torch.where(usable, prod, torch.ones_like(prod))
    return hts / torch.sqrt(prod)


def cka_from_grams(teacher_gram: Tensor, student_gram: Tensor) -> Tensor:
    """CKA from two (n, n) Gram matrices (of row-normalised features: see cosine_gram)."""
    if teacher_gram.dim() != 2 or teacher_gram.shape != student_gram.shape or teacher_gram.shape[0] != teacher_gram.shape[1]:
        raise ValueError(
            f"Gram matrices must both be (n, n) for the same n, got teacher {tuple(teacher_gram.shape)} "
            f"and student {tuple(student_gram.shape)}"
        )
    return _cka_centred(_centre(teacher_gram.to(torch.float64)), _centre(student_gram.to(torch.float64)))


def cka(teacher_feats: Tensor, student_feats: Tensor) -> Tensor:
    """Linear CKA of (n, d_t) and (n, d_s) features (row-normalised, centred, HSIC ratio), float64.

    Differentiable in both arguments; a degenerate Gram (e.g. all tokens identical) gives nan:
    rcka_loss skips those images before calling this.
    """
    if teacher_feats.dim() != 2 or student_feats.dim() != 2 or teacher_feats.shape[0] != student_feats.shape[0]:
        raise ValueError(
            f"features must be (n, d_t) and (n, d_s) with the same n tokens, got teacher "
            f"{tuple(teacher_feats.shape)} and student {tuple(student_feats.shape)}"
        )
    return cka_from_grams(cosine_gram(teacher_feats), cosine_gram(student_feats))


def rcka_loss(
    teacher_feats: list[Tensor],
    student_feats: list[Tensor],
    *,
    teacher_grams: bool = False,
) -> tuple[Tensor, int, int]:
    """L_RCKA = mean over images of 1 - CKA (section 2) -> (loss, images used, images skipped).

    One (n_i, d) tensor per image: the penultimate-layer hidden states at that image's visual
    positions. teacher_grams=True: teacher_feats holds (n_i, n_i) cosine Grams (offline cache).
    Images with < 4 tokens or a degenerate centred Gram (Frobenius norm < 1e-8) are skipped and
    counted. The teacher gets no gradient. No usable image: an exact 0 that is still differentiable.
    """
    if len(teacher_feats) != len(student_feats):
        raise ValueError(
            f"{len(teacher_feats)} teacher images but {len(student_feats)} student images: both models must "
            f"see the same images (check the visual-position extraction of each family adapter)"
        )
    if _stackable(teacher_feats, student_feats, teacher_grams):
        return _rcka_batched(teacher_feats, student_feats, teacher_grams)
    terms: list[Tensor] = []
    skipped = 0
    for i, (t, s) in enumerate(zip(teacher_feats, student_feats)):
        n = s.shape[0]
        nt = t.shape[0]
        if nt != n or (teacher_grams and t.shape != (n, n)):
            raise ValueError(
                f"image {i}: teacher has {tuple(t.shape)} and student {tuple(s.shape)} visual tokens; the counts "
                f"must match (same image, same processor resolution for teacher and student)"
            )
        if n < MIN_TOKENS:
            skipped += 1
            continue
        kt = _centre(t.detach().to(torch.float64) if teacher_grams else cosine_gram(t.detach()))
        ks = _centre(cosine_gram(s))
        # A nan/inf feature is not "degenerate": it makes the loss non-finite, which the objective
        # counts and drops (skipping it here would hide a broken forward pass).
        norms = torch.stack([kt.norm(), ks.detach().norm()])
        if bool((norms < DEGENERATE_NORM).any()):
            skipped += 1
            continue
        terms.append(1.0 - _cka_centred(kt, ks))
    if terms:
        return torch.stack(terms).mean().float(), len(terms), skipped
    if student_feats:
        # An exact 0 tied to the student's graph (empty-slice sum, nan-safe).
        return student_feats[0].reshape(-1)[:0].sum().float(), 0, skipped
    return torch.zeros((), requires_grad=True), 0, skipped


def _stackable(teacher_feats: list[Tensor], student_feats: list[Tensor], teacher_grams: bool) -> bool:
    """Every image with the same token count (>= MIN_TOKENS) and feature widths: one batched pass."""
    if len(student_feats) < 2:
        return False
    n, ds = student_feats[0].shape
    tshape = (n, n) if teacher_grams else (n, teacher_feats[0].shape[-1])
    return n >= MIN_TOKENS and all(s.shape == (n, ds) for s in student_feats) and \
        all(t.shape == tshape for t in teacher_feats)


def _rcka_batched(teacher_feats: list[Tensor], student_feats: list[Tensor], teacher_grams: bool):
    """rcka_loss for B images of n tokens each, as (B, n, n) tensors: the same float64 arithmetic as
    the per-image loop (tests compare them), with one device->host sync instead of one per image."""
    t = torch.stack([x.detach() for x in teacher_feats]).to(torch.float64)
    kt = _centre(t if teacher_grams else _gram(t))
    ks = _centre(_gram(torch.stack(student_feats)))
    norms = torch.stack([kt.flatten(1).norm(dim=1), ks.detach().flatten(1).norm(dim=1)])
    usable = ~(norms < DEGENERATE_NORM).any(0)          # nan/inf stays "usable": the loss shows it
    used = int(usable.sum())
    if used == 0:
        return student_feats[0].reshape(-1)[:0].sum().float(), 0, len(student_feats)
    cka_b = _cka_centred(kt, ks, usable)
    terms = (1.0 - cka_b)[usable]
    return terms.mean().float(), used, len(student_feats) - used
