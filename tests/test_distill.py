"""GRACE objective: plain gated DKD, CKA/RCKA, IB controller, GraceConfig/GraceObjective.

Every loss is checked against the float64 references below, written from grace-method.md
independently of grace_ds.distill (token by token, the non-target distribution built by dropping
the target entry instead of masking its logit, centring with an explicit H matrix).
The fused loss has its own file (test_distill_fused.py) and reuses these references.
"""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from grace_ds.distill import (
    CONTROLLER_PRESETS,
    GraceConfig,
    GraceObjective,
    IBController,
    cka,
    cka_from_grams,
    cosine_gram,
    gated_dkd_loss,
    rcka_loss,
)
from grace_ds.distill.gdkd import kd_loss_with_stats

# ----------------------------------------------------------------------------- float64 references

EPS = 1e-8


def _kl_clamped(p, q):
    return (p * (torch.log(torch.clamp(p, min=EPS)) - torch.log(torch.clamp(q, min=EPS)))).sum()


def _softmax64(z):
    e = torch.exp(z - z.max())
    return e / e.sum()


def ref_token_kd(zs, zt, y, T=2.0, alpha=1.0, beta_dkd=4.0, mode="gdkd"):
    """One token, float64: DKD_i (section 1) or KL(p_T||p_S) T^2."""
    ps, pt = _softmax64(zs / T), _softmax64(zt / T)
    if mode == "kl":
        return _kl_clamped(pt, ps) * T * T
    tckd = _kl_clamped(torch.stack([pt[y], 1 - pt[y]]), torch.stack([ps[y], 1 - ps[y]]))
    keep = torch.arange(zs.numel()) != y
    qs, qt = ps[keep] / ps[keep].sum(), pt[keep] / pt[keep].sum()
    nckd = _kl_clamped(qt, qs)
    return (alpha * tckd + beta_dkd * nckd) * T * T


def ref_gate(zt):
    p = _softmax64(zt)
    h = -(p * torch.log(torch.clamp(p, min=EPS))).sum()
    return torch.exp(-h / math.log(zt.numel())), h


def ref_gdkd(s_logits, t_logits, labels, T=2.0, alpha=1.0, beta_dkd=4.0, mode="gdkd", gate=True, ignore=-100):
    """sum g DKD / sum g over supervised, next-token-shifted tokens; float64; returns (loss, gate_mean, H_mean)."""
    s_logits, t_logits = s_logits.double(), t_logits.detach().double()
    num, den, gs, hs = 0.0, 0.0, [], []
    B, S, _ = s_logits.shape
    for b in range(B):
        for i in range(S - 1):
            y = int(labels[b, i + 1])
            if y == ignore:
                continue
            g, h = ref_gate(t_logits[b, i])
            g = g if gate else torch.ones((), dtype=torch.float64)
            num = num + g * ref_token_kd(s_logits[b, i], t_logits[b, i], y, T, alpha, beta_dkd, mode)
            den = den + g
            gs.append(g)
            hs.append(h)
    return num / den, torch.stack(gs).mean(), torch.stack(hs).mean()


def ref_ce(s_logits, labels, ignore=-100):
    """Mean next-token CE over supervised tokens, float64, token by token."""
    s_logits = s_logits.double()
    tot, n = 0.0, 0
    for b in range(s_logits.shape[0]):
        for i in range(s_logits.shape[1] - 1):
            y = int(labels[b, i + 1])
            if y != ignore:
                z = s_logits[b, i]
                tot = tot + (torch.log(torch.exp(z - z.max()).sum()) + z.max() - z[y])
                n += 1
    return tot / n


def ref_cka(x, y):
    x, y = x.double(), y.double()
    x = x / x.norm(dim=1, keepdim=True)
    y = y / y.norm(dim=1, keepdim=True)
    n = x.shape[0]
    H = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    K, L = H @ (x @ x.T) @ H, H @ (y @ y.T) @ H
    return torch.trace(K @ L) / torch.sqrt(torch.trace(K @ K) * torch.trace(L @ L))


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make_labels(B, S, V, gen, frac_ignored=0.3):
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[torch.rand(B, S, generator=gen) < frac_ignored] = -100
    return labels


# ----------------------------------------------------------------------------- gated DKD (plain)


@pytest.mark.parametrize("mode,gate", [("gdkd", True), ("gdkd", False), ("kl", True), ("kl", False)])
def test_plain_kd_matches_float64_reference_large_vocab(mode, gate):
    gen = torch.Generator().manual_seed(1)
    B, S, V = 2, 13, 4099  # odd vocab, chunk 5 leaves a partial last chunk
    s = (torch.randn(B, S, V, generator=gen) * 3).requires_grad_(True)
    t = torch.randn(B, S, V, generator=gen) * 3
    labels = make_labels(B, S, V, gen)
    loss, gmean, hmean, n = kd_loss_with_stats(s, t, labels, chunk_size=5, kd_mode=mode, gate=gate,
                                               temperature=1.5, alpha=0.7, beta_dkd=3.0)
    s64 = s.detach().double().requires_grad_(True)
    ref, rg, rh = ref_gdkd(s64, t, labels, T=1.5, alpha=0.7, beta_dkd=3.0, mode=mode, gate=gate)
    assert n == int((labels[:, 1:] != -100).sum())
    assert rel_err(loss, ref) < 1e-5
    assert abs(gmean.item() - rg.item()) < 1e-6 and abs(hmean.item() - rh.item()) < 1e-5
    (g,) = torch.autograd.grad(loss, s)
    (rg_,) = torch.autograd.grad(ref, s64)
    assert rel_err(g, rg_) < 1e-5
    # The last position and ignored labels get no gradient.
    assert g[:, -1].abs().max() == 0


def test_gated_dkd_gradcheck_double():
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    labels = make_labels(2, 5, 7, gen, 0.2)
    labels[0, 1] = 3
    assert torch.autograd.gradcheck(lambda x: gated_dkd_loss(x, t, labels, chunk_size=3), (s,))
    # And the value in double equals the reference to round-off.
    assert rel_err(gated_dkd_loss(s, t, labels), ref_gdkd(s, t, labels)[0]) < 1e-12


def test_gdkd_zero_when_student_equals_teacher_and_teacher_gets_no_grad():
    gen = torch.Generator().manual_seed(3)
    t = (torch.randn(2, 9, 301, generator=gen) * 4).requires_grad_(True)
    s = t.detach().clone().requires_grad_(True)
    labels = make_labels(2, 9, 301, gen)
    for mode in ("gdkd", "kl"):
        loss = kd_loss_with_stats(s, t, labels, kd_mode=mode)[0]
        assert abs(loss.item()) < 1e-6
    gated_dkd_loss(s, t, labels).backward()
    assert t.grad is None and s.grad is not None


def test_gate_bounds_uniform_and_peaked_teacher():
    V = 1000
    labels = torch.full((1, 4), 5)
    s = torch.randn(1, 4, V)
    # Uniform teacher: H = log V -> g = 1/e exactly; a near one-hot teacher: g -> 1.
    _, g_uniform, h_uniform, _ = kd_loss_with_stats(s, torch.zeros(1, 4, V), labels)
    assert abs(g_uniform.item() - math.exp(-1)) < 1e-6 and abs(h_uniform.item() - math.log(V)) < 1e-4
    peaked = torch.zeros(1, 4, V)
    peaked[..., 7] = 60.0
    _, g_peak, _, _ = kd_loss_with_stats(s, peaked, labels)
    assert g_peak.item() > 0.999
    _, g_rand, _, _ = kd_loss_with_stats(s, torch.randn(1, 4, V) * 5, labels)
    assert math.exp(-1) - 1e-6 <= g_rand.item() <= 1.0


def test_gated_mean_weights_confident_tokens_more():
    # Two tokens, one confident teacher and one uniform teacher: the loss must equal the gate-weighted
    # mean, not the plain mean (a test that would pass with gate=False would be worthless).
    V = 50
    gen = torch.Generator().manual_seed(4)
    t = torch.zeros(1, 3, V)
    t[0, 0, 3] = 12.0
    s = torch.randn(1, 3, V, generator=gen) * 2
    labels = torch.tensor([[0, 3, 4]])
    gated = gated_dkd_loss(s, t, labels)
    plain = kd_loss_with_stats(s, t, labels, gate=False)[0]
    ref = ref_gdkd(s, t, labels)[0]
    assert rel_err(gated, ref) < 1e-5 and abs(gated.item() - plain.item()) > 1e-3


def test_no_supervised_tokens_gives_differentiable_zero():
    s = torch.randn(2, 4, 11, requires_grad=True)
    labels = torch.full((2, 4), -100)
    labels[:, 0] = 1  # position 0's label is never a target after the shift
    loss = gated_dkd_loss(s, torch.randn(2, 4, 11), labels)
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad is not None and s.grad.abs().max() == 0


def test_plain_kd_bad_input_errors():
    s = torch.randn(1, 3, 10)
    with pytest.raises(ValueError, match="shared vocabulary"):
        gated_dkd_loss(s, torch.randn(1, 3, 12), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="label 10"):
        gated_dkd_loss(s, s, torch.tensor([[0, 10, 1]]))
    with pytest.raises(ValueError, match="temperature"):
        gated_dkd_loss(s, s, torch.zeros(1, 3, dtype=torch.long), temperature=0.0)


# ----------------------------------------------------------------------------- CKA / RCKA


def _orthogonal(d, gen):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q


def test_cka_matches_reference_and_invariances():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(17, 24, generator=gen, dtype=torch.float64)
    y = torch.randn(17, 8, generator=gen, dtype=torch.float64) + 0.5 * x[:, :8]  # d_t != d_s
    ref = ref_cka(x, y)
    assert abs(cka(x, y).item() - ref.item()) < 1e-12
    assert abs(cka(x.float(), y.float()).item() - ref.item()) < 1e-5
    assert abs(cka(x, x).item() - 1.0) < 1e-12
    assert abs(cka(x @ _orthogonal(24, gen), y).item() - ref.item()) < 1e-12
    assert abs(cka(x, y @ _orthogonal(8, gen)).item() - ref.item()) < 1e-12
    assert abs(cka(3.7 * x, y).item() - ref.item()) < 1e-12
    assert abs(cka(x, 0.01 * y).item() - ref.item()) < 1e-12
    assert abs(cka_from_grams(cosine_gram(x), cosine_gram(y)).item() - ref.item()) < 1e-12
    assert cka(x, torch.randn(17, 8, generator=gen, dtype=torch.float64)).item() < 0.9  # not always 1


def test_cka_gradcheck_double():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cka, (x, y))


def test_rcka_loss_mean_skips_and_grads():
    gen = torch.Generator().manual_seed(7)
    t = [torch.randn(n, 12, generator=gen) for n in (9, 3, 6, 5)]
    s = [torch.randn(n, 7, generator=gen, requires_grad=True) for n in (9, 3, 6, 5)]
    t[3] = torch.ones(5, 12)  # identical tokens: centred Gram is 0 -> degenerate, skipped
    loss, used, skipped = rcka_loss(t, s)
    assert (used, skipped) == (2, 2)
    ref = ((1 - ref_cka(t[0], s[0])) + (1 - ref_cka(t[2], s[2]))) / 2
    assert abs(loss.item() - ref.item()) < 1e-6
    loss.backward()
    assert s[0].grad.abs().max() > 0 and s[1].grad is None and s[3].grad is None
    # The offline-cache form (teacher Grams) gives the same value.
    loss_g, used_g, _ = rcka_loss([cosine_gram(x) for x in t], s, teacher_grams=True)
    assert used_g == 2 and abs(loss_g.item() - loss.item()) < 1e-6


@pytest.mark.parametrize("teacher_grams", [False, True])
def test_rcka_batched_path_equals_the_per_image_loop(monkeypatch, teacher_grams):
    """Equal-size images take one batched float64 pass: loss, counts and every gradient equal the
    per-image loop, with degenerate images (teacher or student side) skipped by both."""
    cka_mod = importlib.import_module("grace_ds.distill.cka")   # the package re-exports a function named cka

    gen = torch.Generator().manual_seed(11)
    t = [torch.randn(16, 12, generator=gen) for _ in range(6)]
    t[2] = torch.ones(16, 12)                                   # degenerate teacher Gram
    base = [torch.randn(16, 7, generator=gen) for _ in range(6)]
    base[4] = torch.ones(16, 7) * 3.0                           # degenerate student Gram
    tin = [cosine_gram(x) for x in t] if teacher_grams else t

    def run(batched: bool):
        monkeypatch.setattr(cka_mod, "_stackable", lambda *a: batched and cka_mod_stackable(*a))
        s = [x.clone().requires_grad_(True) for x in base]
        loss, used, skipped = rcka_loss(tin, s, teacher_grams=teacher_grams)
        loss.backward()
        return loss, used, skipped, [x.grad if x.grad is not None else torch.zeros_like(x) for x in s]

    cka_mod_stackable = cka_mod._stackable
    assert cka_mod_stackable(tin, base, teacher_grams)
    lb, ub, sb, gb = run(True)
    ll, ul, sl, gl = run(False)
    assert (ub, sb) == (ul, sl) == (4, 2)
    torch.testing.assert_close(lb, ll, rtol=1e-12, atol=1e-12)
    for a, b in zip(gb, gl):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        assert torch.isfinite(a).all()
    assert gb[0].abs().max() > 0 and gb[2].abs().max() == 0 and gb[4].abs().max() == 0
    # a nan feature is not skipped: the loss shows it on both paths
    bad = [x.clone() for x in base]
    bad[1][0, 0] = float("nan")
    assert torch.isnan(rcka_loss(tin, bad, teacher_grams=teacher_grams)[0])


def test_rcka_none_usable_is_differentiable_zero_and_mismatch_errors():
    s = [torch.randn(2, 4, requires_grad=True)]
    loss, used, skipped = rcka_loss([torch.randn(2, 6)], s)
    assert (loss.item(), used, skipped) == (0.0, 0, 1)
    loss.backward()
    loss, used, skipped = rcka_loss([], [])
    assert (loss.item(), used, skipped) == (0.0, 0, 0)
    loss.backward()
    with pytest.raises(ValueError, match="image 0"):
        rcka_loss([torch.randn(5, 6)], [torch.randn(4, 6)])
    with pytest.raises(ValueError, match="2 teacher images but 1"):
        rcka_loss([torch.randn(5, 6)] * 2, [torch.randn(5, 6)])


# ----------------------------------------------------------------------------- controller


def test_controller_update_rule_bounds_and_resume():
    c = IBController(tau=1.0, eta=0.1, beta_init=1.0, beta_min=0.5, beta_max=2.0, ema_decay=0.9)
    assert c.update(3.0) == pytest.approx(1.0 + 0.1 * (3.0 - 1.0))  # ema starts at the first value
    assert c.ema == 3.0
    c.update(3.0)
    assert c.beta > 1.2  # rises above tau
    for _ in range(100):
        c.update(10.0)
    assert c.beta == 2.0  # clipped at beta_max
    down = IBController(tau=1.0, eta=0.1, beta_init=1.0, beta_min=0.5, beta_max=2.0, ema_decay=0.0)
    down.update(0.2)
    assert down.beta == pytest.approx(1.0 - 0.08)  # falls below tau
    for _ in range(100):
        down.update(0.0)
    assert down.beta == 0.5
    # Hand recurrence for a mixed sequence; then resume from state_dict halfway.
    vals = [0.9, 1.4, 0.3, 2.5, 1.1, 0.7]
    a = IBController(tau=1.0, eta=0.2, beta_init=1.0, beta_min=0.1, beta_max=5.0, ema_decay=0.8)
    ema, beta = None, 1.0
    for v in vals:
        ema = v if ema is None else 0.8 * ema + 0.2 * v
        beta = min(5.0, max(0.1, beta + 0.2 * (ema - 1.0)))
        assert a.update(v) == pytest.approx(beta, abs=1e-12)
    b = IBController(tau=1.0, eta=0.2, beta_init=1.0, beta_min=0.1, beta_max=5.0, ema_decay=0.8)
    for v in vals[:3]:
        b.update(v)
    c2 = IBController(tau=1.0, eta=0.2, beta_init=1.0, beta_min=0.1, beta_max=5.0, ema_decay=0.8)
    c2.load_state_dict(b.state_dict())
    for v in vals[3:]:
        c2.update(v)
    assert c2.state_dict() == a.state_dict()
    assert a.update(float("nan")) == a.beta and a.steps == len(vals)  # a nan reading is ignored


def test_controller_presets_and_validation():
    code = IBController.from_preset("code")
    assert (code.tau, code.eta, code.beta, code.beta_min, code.beta_max, code.ema_decay) == (
        0.35, 0.0015, 1.0, 0.1, 5.0, 0.99)
    auth = IBController.from_preset("authors_script")
    assert (auth.tau, auth.eta, auth.beta, auth.beta_max) == (3.0, 0.003, 0.5, 1.0)
    assert set(CONTROLLER_PRESETS) == {"code", "authors_script"}
    with pytest.raises(ValueError, match="beta_init=7"):
        IBController(beta_init=7)
    with pytest.raises(ValueError, match="ema_decay"):
        IBController(ema_decay=1.0)
    with pytest.raises(ValueError, match="unknown controller preset"):
        IBController.from_preset("paper")


# ----------------------------------------------------------------------------- config / objective


def test_grace_config_defaults_and_validation():
    c = GraceConfig()
    assert (c.temperature, c.alpha, c.beta_dkd, c.omega, c.chunk_size, c.kd_mode) == (2.0, 1.0, 4.0, 1.0, 1024, "gdkd")
    assert (c.tau, c.eta, c.beta_init, c.beta_min, c.beta_max, c.ema_decay) == (0.35, 0.0015, 1.0, 0.1, 5.0, 0.99)
    a = GraceConfig.authors_script()
    assert (a.omega, a.omega_warmup_steps, a.tau, a.beta_init, a.beta_max) == (3.0, 400, 3.0, 0.5, 1.0)
    assert GraceConfig.from_dict(c.to_dict()) == c
    for bad, match in [(dict(kd_mode="dkd"), "kd_mode"), (dict(gate="false"), "grace.gate"),
                       (dict(temperature=-1.0), "temperature"), (dict(omega_warmup_steps=1.5), "omega_warmup"),
                       (dict(beta_init=9.0), "beta_init"), (dict(chunk_size=0), "chunk_size"),
                       (dict(fixed_beta=float("nan")), "fixed_beta")]:
        with pytest.raises(ValueError, match=match):
            GraceConfig(**bad)
    with pytest.raises(ValueError, match="unknown grace option"):
        GraceConfig.from_dict({"temprature": 2.0})


def _objective_inputs(gen, B=2, S=11, Hs=16, Ht=24, Vs=203, Vt=211):
    hs = torch.randn(B, S, Hs, generator=gen, requires_grad=True)
    ws = (torch.randn(Vs, Hs, generator=gen) * 0.5).requires_grad_(True)
    ht = torch.randn(B, S, Ht, generator=gen)
    wt = torch.randn(Vt, Ht, generator=gen) * 0.5
    labels = make_labels(B, S, 200, gen)
    sv = [torch.randn(n, Hs, generator=gen, requires_grad=True) for n in (6, 2)]
    tv = [torch.randn(n, Ht, generator=gen) for n in (6, 2)]
    return dict(labels=labels, student_hidden=hs, student_weight=ws, teacher_hidden=ht, teacher_weight=wt,
                student_visual=sv, teacher_visual=tv)


def test_objective_combines_terms_against_reference():
    gen = torch.Generator().manual_seed(8)
    inp = _objective_inputs(gen)
    obj = GraceObjective(GraceConfig(omega=3.0, omega_warmup_steps=4, kd_warmup_steps=2, chunk_size=7,
                                     controller=False, fixed_beta=0.8))
    loss, m = obj(step=1, vocab_size=200, **inp)
    ls = F.linear(inp["student_hidden"], inp["student_weight"]).double()
    lt = F.linear(inp["teacher_hidden"], inp["teacher_weight"]).double()
    ref_kd, ref_g, ref_h = ref_gdkd(ls[..., :200], lt[..., :200], inp["labels"])
    ref_r = 1 - ref_cka(inp["teacher_visual"][0], inp["student_visual"][0])
    ref_loss = ref_ce(ls, inp["labels"]) + 0.8 * 0.5 * ref_kd + 3.0 * 0.25 * ref_r
    assert rel_err(loss, ref_loss) < 1e-5
    assert m["beta"] == pytest.approx(0.4) and m["omega"] == pytest.approx(0.75) and m["beta_controller"] == 0.8
    assert m["gdkd"] == pytest.approx(ref_kd.item(), rel=1e-5) and m["gate_mean"] == pytest.approx(ref_g.item(), rel=1e-6)
    assert m["teacher_entropy"] == pytest.approx(ref_h.item(), rel=1e-5)
    assert (m["rcka_used"], m["rcka_skipped"], m["nonfinite_kd"], m["nonfinite_rcka"]) == (1, 1, 0, 0)
    assert m["ce"] + m["beta"] * m["gdkd"] + m["omega"] * m["rcka"] == pytest.approx(loss.item(), rel=1e-6)
    # Non-fused and logits inputs give the same loss.
    plain = GraceObjective(GraceConfig(omega=3.0, omega_warmup_steps=4, kd_warmup_steps=2, chunk_size=7,
                                       controller=False, fixed_beta=0.8, fused=False))
    assert plain(step=1, vocab_size=200, **inp)[0].item() == pytest.approx(loss.item(), rel=1e-6)
    # Warm-up step 0: both weights are 0 and the loss is the CE alone.
    l0, m0 = obj(step=0, vocab_size=200, **inp)
    assert (m0["beta"], m0["omega"]) == (0.0, 0.0) and l0.item() == pytest.approx(m0["ce"], rel=1e-7)
    logit_inp = {k: v for k, v in inp.items() if "hidden" not in k and "weight" not in k}
    l3, _ = plain(step=1, vocab_size=200, student_logits=ls.float(), teacher_logits=lt.float(), **logit_inp)
    assert l3.item() == pytest.approx(loss.item(), rel=1e-6)


def test_objective_nonfinite_terms_are_dropped_and_counted_ce_raises():
    gen = torch.Generator().manual_seed(9)
    inp = _objective_inputs(gen)
    obj = GraceObjective(GraceConfig(chunk_size=5))
    clean, _ = obj(step=0, vocab_size=200, **inp)
    ce_only, _ = GraceObjective(GraceConfig(use_kd=False, use_rcka=False))(step=0, **inp)
    bad = dict(inp, teacher_hidden=inp["teacher_hidden"].clone())
    bad["teacher_hidden"][0, :, 0] = float("nan")  # every position: some are unsupervised
    bad["teacher_visual"] = [inp["teacher_visual"][0].clone() * float("nan"), inp["teacher_visual"][1]]
    loss, m = obj(step=3, vocab_size=200, **bad)
    assert math.isnan(m["gdkd"]) and math.isnan(m["rcka"])
    assert (m["nonfinite_kd"], m["nonfinite_rcka"]) == (1, 1)
    assert loss.item() == pytest.approx(ce_only.item(), rel=1e-6) and loss.item() != pytest.approx(clean.item())
    loss.backward()
    assert torch.isfinite(inp["student_hidden"].grad).all() and torch.isfinite(inp["student_weight"].grad).all()
    assert obj.state_dict()["counters"] == {"nonfinite_kd": 1, "nonfinite_rcka": 1}
    nan_student = dict(inp, student_hidden=inp["student_hidden"].detach().clone())
    nan_student["student_hidden"][0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="at step 17"):
        obj(step=17, vocab_size=200, **nan_student)


def test_objective_controller_step_and_state_roundtrip():
    obj = GraceObjective(GraceConfig(tau=1.0, eta=0.5, beta_init=1.0, beta_min=0.1, beta_max=5.0, ema_decay=0.0))
    assert obj.controller_step(3.0) == pytest.approx(2.0)
    assert obj.beta == pytest.approx(2.0)
    gen = torch.Generator().manual_seed(10)
    _, m = obj(step=0, **_objective_inputs(gen))
    assert m["beta"] == pytest.approx(2.0)
    other = GraceObjective(obj.cfg)
    other.load_state_dict(obj.state_dict())
    assert other.controller_step(0.5) == obj.controller_step(0.5)
    fixed = GraceObjective(GraceConfig(controller=False, fixed_beta=0.3))
    assert fixed.controller_step(100.0) == 0.3
    with pytest.raises(KeyError, match="no controller state"):
        obj.load_state_dict(fixed.state_dict())
