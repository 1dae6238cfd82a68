"""grace_ds.quant against float64 references written from grace-method.md section 4 / LSQ.

The references below use numpy in float64 and loop over groups explicitly; they share no code
with grace_ds.quant.
"""

import math

import numpy as np
import pytest
import torch
import transformers
from torch import nn

import grace_ds.quant.lsq as lsq
from grace_ds.quant import (QATLinear, QuantConfig, bake_fake_quant, export_int_weights, fake_quantize,
                            init_log_scale, prepare_qat, scale_param_groups)


# ---------------------------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------------------------

def ref_groups(in_features, group_size):
    return group_size if in_features % group_size == 0 else in_features


def ref_fake_quant(W, theta, bits, group_size):
    """W_hat (float64 ndarray), groups walked one by one."""
    W = np.asarray(W, dtype=np.float64)
    theta = np.asarray(theta, dtype=np.float64).reshape(-1)
    out_f, in_f = W.shape
    g = ref_groups(in_f, group_size)
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    W_hat = np.empty_like(W)
    k = 0
    for r in range(out_f):
        for c0 in range(0, in_f, g):
            s = math.exp(theta[k])
            W_hat[r, c0:c0 + g] = s * np.clip(np.round(W[r, c0:c0 + g] / s), qn, qp)
            k += 1
    return W_hat


def ref_lsq_grads(W, theta, G, bits, group_size, grad_scale=False):
    """LSQ (Esser et al. 2020, eq. 3) gradients of sum(G * W_hat) w.r.t. W and theta = ln s:
    dW_hat/dW = 1 inside [q_n, q_p] (on W/s) else 0; dW_hat/ds = round(W/s) - W/s inside, q_n / q_p
    at the clamps; d/dtheta = s * d/ds; optional gradient scale 1/sqrt(g * q_p) on the scale."""
    W = np.asarray(W, dtype=np.float64)
    G = np.asarray(G, dtype=np.float64)
    theta = np.asarray(theta, dtype=np.float64).reshape(-1)
    out_f, in_f = W.shape
    g = ref_groups(in_f, group_size)
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    dW = np.zeros_like(W)
    dtheta = np.zeros_like(theta)
    k = 0
    for r in range(out_f):
        for c0 in range(0, in_f, g):
            s = math.exp(theta[k])
            ds = 0.0
            for c in range(c0, c0 + g):
                x = W[r, c] / s
                if x < qn:
                    ds += G[r, c] * qn
                elif x > qp:
                    ds += G[r, c] * qp
                else:
                    ds += G[r, c] * (np.round(x) - x)
                    dW[r, c] = G[r, c]
            dtheta[k] = ds * s * ((1.0 / math.sqrt(g * qp)) if grad_scale else 1.0)
            k += 1
    return dW, dtheta


def ref_group_errors(w, bits, candidates=20, lo=0.3, hi=1.2):
    """(candidate scales, squared errors) of one group, float64, as grace-method.md describes."""
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    amax = max(float(np.abs(w).max()), lsq.MIN_GROUP_AMAX)   # documented all-zero-group rule
    scales = [m * amax / qp for m in np.linspace(lo, hi, candidates)]
    errs = [float(np.sum((w - s * np.clip(np.round(w / s), qn, qp)) ** 2)) for s in scales]
    return scales, errs


def near_tie(W, theta, group_size, bits, tol=1e-4):
    """Elements where fp32 and float64 may round differently: x within tol of a .5 tie or of the
    clamp edges. Only these may disagree between the fp32 code and the float64 reference."""
    W = np.asarray(W, np.float64)
    g = ref_groups(W.shape[1], group_size)
    s = np.exp(np.asarray(theta, np.float64)).reshape(W.shape[0], -1).repeat(g, axis=1)
    x = W / s
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    frac = np.abs(x - np.floor(x) - 0.5)
    return (frac < tol) | (np.abs(x - qn) < tol) | (np.abs(x - qp) < tol)


def perturbed_theta(W, bits, group_size, gen, spread=0.6):
    """Init scales randomly shrunk/grown, so both clamp branches and the interior are exercised."""
    theta = init_log_scale(W, bits, group_size)
    return theta + spread * (torch.rand(theta.shape, generator=gen) - 0.7)


SHAPES = [(6, 256, 128), (5, 96, 128), (4, 64, 32)]     # (out, in, group_size); 96 % 128: one group per row


# ---------------------------------------------------------------------------------------------
# fake_quantize: value and gradients
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_fake_quantize_value_matches_float64_reference(bits, shape):
    out_f, in_f, gs = shape
    gen = torch.Generator().manual_seed(bits * 1000 + in_f)
    W = torch.randn(out_f, in_f, generator=gen) * 0.05
    theta = perturbed_theta(W, bits, gs, gen)
    got = fake_quantize(W, theta, bits, gs)
    assert got.dtype == torch.float32 and got.shape == W.shape
    ref = ref_fake_quant(W.numpy(), theta.numpy(), bits, gs)
    ok = ~near_tie(W.numpy(), theta.numpy(), gs, bits)
    assert ok.mean() > 0.99
    np.testing.assert_allclose(got.numpy()[ok], ref[ok], rtol=1e-6, atol=1e-9)
    # float64 inputs take float64 arithmetic: then the match is exact up to exp's last ulp
    got64 = fake_quantize(W.double(), theta.double(), bits, gs)
    np.testing.assert_allclose(got64.numpy(), ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("grad_scale", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_fake_quantize_gradients_match_lsq(bits, shape, grad_scale):
    out_f, in_f, gs = shape
    gen = torch.Generator().manual_seed(7 + bits + in_f)
    W = (torch.randn(out_f, in_f, generator=gen) * 0.05).double().requires_grad_()
    theta = perturbed_theta(W.detach().float(), bits, gs, gen).double().requires_grad_()
    G = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    (fake_quantize(W, theta, bits, gs, lsq_grad_scale=grad_scale) * G).sum().backward()
    dW, dtheta = ref_lsq_grads(W.detach().numpy(), theta.detach().numpy(), G.numpy(), bits, gs, grad_scale)
    x = W.detach().numpy() / np.exp(theta.detach().numpy()).reshape(out_f, -1).repeat(ref_groups(in_f, gs), 1)
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert (x < qn).any() and (x > qp).any() and ((x > qn) & (x < qp)).any(), "all three branches exercised"
    np.testing.assert_allclose(W.grad.numpy(), dW, rtol=0, atol=0)
    np.testing.assert_allclose(theta.grad.numpy(), dtheta, rtol=1e-10, atol=1e-12)


def test_fake_quantize_gradients_in_fp32_and_bf16():
    gen = torch.Generator().manual_seed(3)
    W32 = torch.randn(8, 256, generator=gen) * 0.05
    theta0 = perturbed_theta(W32, 4, 128, gen)
    G = torch.randn(8, 256, generator=gen)
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]:
        W = W32.detach().to(dtype).clone().requires_grad_()
        theta = theta0.clone().requires_grad_()
        out = fake_quantize(W, theta, 4, 128)
        assert out.dtype == dtype
        # the fp32 computation, rounded once to the weight's dtype
        assert torch.equal(out, fake_quantize(W.detach().float(), theta0, 4, 128).to(dtype))
        (out.float() * G).sum().backward()
        assert W.grad.dtype == dtype and theta.grad.dtype == torch.float32
        dW, dtheta = ref_lsq_grads(W.detach().double().numpy(), theta0.numpy(),
                                   G.to(dtype).double().numpy(), 4, 128)
        ok = ~near_tie(W.detach().double().numpy(), theta0.numpy(), 128, 4)
        np.testing.assert_allclose(W.grad.double().numpy()[ok], dW[ok], rtol=tol, atol=0)
        np.testing.assert_allclose(theta.grad.numpy(), dtheta, rtol=tol, atol=tol * np.abs(dtheta).max())


def test_gradcheck_where_the_lsq_gradient_is_the_true_derivative():
    # With every |W/s| beyond the grid, W_hat = s * (q_n or q_p) exactly: smooth in theta, flat in
    # W. There the STE/LSQ gradient IS the derivative, so finite differences must agree (this checks
    # the exp chain rule, the clamp branch and the theta clamp; inside the grid round() has zero
    # derivative and only the analytic comparison above is meaningful).
    gen = torch.Generator().manual_seed(11)
    sign = torch.where(torch.rand(3, 64, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
    W = (sign * (2.0 + torch.rand(3, 64, generator=gen, dtype=torch.float64))).requires_grad_()
    theta = torch.full((6,), math.log(0.1), dtype=torch.float64)          # |x| >= 20 > 8
    theta = (theta + 0.1 * torch.rand(6, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda w, t: fake_quantize(w, t, 4, 32), (W, theta))
    # theta clamp: groups 0-2 sit inside the clamp, 3-5 beyond it (gradient 0 there)
    clamp = (-3.0, float(theta[:3].detach().max()) + 1e-3)
    with torch.no_grad():
        theta[3:] = clamp[1] + 0.5
    assert torch.autograd.gradcheck(lambda w, t: fake_quantize(w, t, 4, 32, log_scale_clamp=clamp), (W, theta))
    t = theta.detach().clone().requires_grad_()
    fake_quantize(W.detach(), t, 4, 32, log_scale_clamp=clamp).sum().backward()
    assert (t.grad[3:] == 0).all() and (t.grad[:3] != 0).all()


def test_gradcheck_qat_linear_input_and_bias():
    torch.manual_seed(0)
    lin = nn.Linear(64, 5).double()
    qat = QATLinear(lin, QuantConfig(group_size=32))
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: nn.functional.linear(
        x, fake_quantize(qat.weight, qat.log_scale, 4, 32), b), (x, qat.bias))
    assert torch.equal(qat(x), nn.functional.linear(x, fake_quantize(lin.weight, qat.log_scale, 4, 32), lin.bias))


# ---------------------------------------------------------------------------------------------
# init_log_scale: the grid search
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_init_reproduces_bruteforce_grid_search(bits, shape):
    out_f, in_f, gs = shape
    gen = torch.Generator().manual_seed(bits + in_f)
    W = torch.randn(out_f, in_f, generator=gen) * torch.rand(out_f, 1, generator=gen)
    W[1] = 0.0                                     # an all-zero row (pruned unit)
    W[2, : ref_groups(in_f, gs)] = 1e-12           # a group below MIN_GROUP_AMAX
    W[3, 5] = 40.0                                 # an outlier stretching one group's grid
    theta = init_log_scale(W, bits, gs)
    g = ref_groups(in_f, gs)
    assert theta.dtype == torch.float32 and theta.shape == (out_f * in_f // g,)
    assert torch.isfinite(theta).all()
    groups = W.double().numpy().reshape(-1, g)
    exact = 0
    for k, w in enumerate(groups):
        scales, errs = ref_group_errors(w, bits)
        best = int(np.argmin(errs))
        got = math.exp(float(theta[k]))
        picked = int(np.argmin(np.abs(np.array(scales) - got)))
        assert abs(scales[picked] - got) <= 1e-5 * scales[picked], (k, got, scales)
        if picked == best:
            exact += 1
        else:   # fp32 vs float64 sums may break a near tie the other way; nothing else may differ
            assert errs[picked] <= errs[best] * (1 + 1e-5), (k, picked, best, errs)
    assert exact >= len(groups) - 1
    # all-zero group: the documented tiny scale, and a zero reconstruction
    zero_groups = slice(1 * in_f // g, 2 * in_f // g)
    np.testing.assert_allclose(theta[zero_groups].exp().numpy(), 0.3 * lsq.MIN_GROUP_AMAX / (2 ** (bits - 1) - 1), rtol=1e-5)
    assert (fake_quantize(W, theta, bits, gs)[1] == 0).all()


def test_init_chunking_does_not_change_the_result(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(37, 384, generator=gen)
    full = init_log_scale(W, 4, 128)
    monkeypatch.setattr(lsq, "INIT_CHUNK_NUMEL", 128 * 10)   # 10 groups per chunk, 111 groups: ragged tail
    assert torch.equal(init_log_scale(W, 4, 128), full)


def test_init_custom_candidates_and_range():
    gen = torch.Generator().manual_seed(9)
    W = torch.randn(4, 128, generator=gen)
    theta = init_log_scale(W, 4, 128, candidates=1, init_range=(0.5, 0.5))
    np.testing.assert_allclose(theta.exp().numpy(), 0.5 * W.abs().amax(1).numpy() / 7, rtol=1e-6)


def test_init_rejects_an_empty_zero3_shard():
    # the ZeRO-3 trap: a partitioned weight outside forward is an empty tensor
    with pytest.raises(ValueError, match="GatheredParameters"):
        init_log_scale(torch.empty(0), 4, 128)


# ---------------------------------------------------------------------------------------------
# config and argument errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [3, 2, 16, 0, True, 4.0])
def test_bad_bits_named(bits):
    with pytest.raises(ValueError, match=rf"bits={bits!r}"):
        QuantConfig(bits=bits)
    with pytest.raises(ValueError, match=rf"bits={bits!r}"):
        fake_quantize(torch.randn(2, 128), torch.zeros(2), bits=bits)
    with pytest.raises(ValueError, match=rf"bits={bits!r}"):
        init_log_scale(torch.randn(2, 128), bits=bits)


@pytest.mark.parametrize("group_size", [0, -128, 1.5])
def test_bad_group_size_named(group_size):
    with pytest.raises(ValueError, match=rf"group_size={group_size!r}"):
        QuantConfig(group_size=group_size)
    with pytest.raises(ValueError, match=rf"group_size={group_size!r}"):
        fake_quantize(torch.randn(2, 128), torch.zeros(2), group_size=group_size)
    with pytest.raises(ValueError, match=rf"group_size={group_size!r}"):
        init_log_scale(torch.randn(2, 128), group_size=group_size)


@pytest.mark.parametrize("kwargs, match", [
    (dict(init_candidates=0), "init_candidates=0"),
    (dict(init_range=(0.0, 1.2)), r"init_range=\(0.0, 1.2\)"),
    (dict(init_range=(1.2, 0.3)), r"init_range=\(1.2, 0.3\)"),
    (dict(log_scale_clamp=(2.0, -2.0)), r"log_scale_clamp=\(2.0, -2.0\)"),
    (dict(include=r"layers\."), "one string"),
    (dict(exclude=("(",)), r"exclude pattern '\('"),
    (dict(scale_lr_mult=0), "scale_lr_mult=0"),
])
def test_bad_config_fields_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_config_dict_roundtrip():
    cfg = QuantConfig(bits=8, group_size=64, log_scale_clamp=(-12.0, 2.0), lsq_grad_scale=True)
    d = cfg.to_dict()
    assert d["init_range"] == [0.3, 1.2] and d["log_scale_clamp"] == [-12.0, 2.0]
    assert QuantConfig.from_dict(d) == cfg
    assert QuantConfig.from_dict({**d, "layers": ["a.b"]}) == cfg      # export adds "layers"
    with pytest.raises(ValueError, match="groupsize"):
        QuantConfig.from_dict({"groupsize": 64})


def test_log_scale_size_mismatch_named():
    with pytest.raises(ValueError, match="log_scale has 3 entries.*2 groups"):
        fake_quantize(torch.randn(2, 256), torch.zeros(3), 4, 256)
    with pytest.raises(ValueError, match=r"2-D"):
        fake_quantize(torch.randn(2, 2, 128), torch.zeros(4))


def test_group_size_fallback():
    assert lsq.effective_group_size(4096, 128) == 128
    assert lsq.effective_group_size(96, 128) == 96
    assert lsq.effective_group_size(200, 128) == 200
    assert QATLinear(nn.Linear(200, 3), QuantConfig()).log_scale.shape == (3,)
    q = QATLinear(nn.Linear(384, 3), QuantConfig())
    assert q.group_size == 128 and q.log_scale.shape == (9,)


# ---------------------------------------------------------------------------------------------
# models: prepare_qat, parameter groups, export, bake
# ---------------------------------------------------------------------------------------------

def tiny_qwen2vl_config(hidden=128):
    """Qwen2-VL from a tiny config: text hidden 128 (one 128-group per row for q/k/v/o/gate/up,
    two for down_proj), 2 decoder layers, vocabulary 512."""
    return transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_parameters=dict(rope_type="default", mrope_section=[4, 6, 6], rope_theta=10000.0),
                         bos_token_id=0, eos_token_id=1, pad_token_id=2),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)


def tiny_qwen2vl(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return transformers.Qwen2VLForConditionalGeneration(tiny_qwen2vl_config()).to(dtype)


QWEN_DECODER_LINEARS = {f"model.language_model.layers.{i}.{p}" for i in range(2) for p in
                        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}


def test_prepare_qat_on_qwen2vl_selects_decoder_linears_and_shares_parameters():
    model = tiny_qwen2vl()
    before = dict(model.named_parameters())
    keys_before = set(model.state_dict())
    lin_before = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    loss_bf16 = model(input_ids=ids, labels=ids).loss

    replaced = prepare_qat(model, QuantConfig())
    assert set(replaced) == QWEN_DECODER_LINEARS
    for name, qat in replaced.items():
        assert model.get_submodule(name) is qat
        assert qat.weight is lin_before[name].weight and qat.bias is lin_before[name].bias   # shared, not copied
        assert qat.log_scale.dtype == torch.float32
        assert torch.equal(qat.log_scale.data, init_log_scale(qat.weight, 4, 128))
    assert replaced["model.language_model.layers.0.mlp.down_proj"].log_scale.shape == (128 * 2,)
    # vision tower, merger, lm_head, embeddings untouched
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert name not in QWEN_DECODER_LINEARS and lin_before[name] is m
    # checkpoints keep the latent weights under their old names, plus one log_scale per layer
    keys_after = set(model.state_dict())
    assert keys_after - keys_before == {f"{n}.log_scale" for n in QWEN_DECODER_LINEARS}
    assert keys_before <= keys_after
    for n, p in before.items():
        assert dict(model.named_parameters())[n] is p
    # the quantised model still works, and is a perturbation of the 16-bit one
    loss_q = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss_q) and abs(loss_q.item() - loss_bf16.item()) < 0.5
    loss_q.backward()
    assert all(q.log_scale.grad is not None and q.log_scale.grad.abs().sum() > 0 for q in replaced.values())
    # nothing left to replace: a clear error, not a silent no-op
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        prepare_qat(model, QuantConfig())


def test_prepare_qat_llava_names_and_custom_patterns():
    cfg = transformers.LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
        image_token_id=255)
    model = transformers.LlavaForConditionalGeneration(cfg)
    replaced = prepare_qat(model, QuantConfig(group_size=32))
    assert set(replaced) == {f"model.language_model.layers.0.{p}" for p in
                             ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}
    model2 = transformers.LlavaForConditionalGeneration(cfg)
    only_mlp = prepare_qat(model2, QuantConfig(include=(r"language_model\.layers\.\d+\.mlp\.",),
                                               exclude=(r"down_proj",)))
    assert set(only_mlp) == {"model.language_model.layers.0.mlp.gate_proj", "model.language_model.layers.0.mlp.up_proj"}


def test_scale_param_groups_cover_each_trainable_parameter_once():
    model = tiny_qwen2vl()
    for p in model.model.visual.parameters():          # frozen vision tower
        p.requires_grad_(False)
    replaced = prepare_qat(model, QuantConfig(scale_lr_mult=20.0))
    groups = scale_param_groups(model, lr=1e-4, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["weights", "no_decay", "scales"]
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(seen) == len(set(seen)) and set(seen) == trainable
    assert {id(q.log_scale) for q in replaced.values()} == {id(p) for p in by_name["scales"]["params"]}
    assert by_name["scales"]["lr"] == pytest.approx(20.0 * 1e-4) and by_name["scales"]["weight_decay"] == 0.0
    assert by_name["weights"]["lr"] == 1e-4 and by_name["weights"]["weight_decay"] == 0.1
    assert all(p.dim() >= 2 for p in by_name["weights"]["params"])
    assert all(p.dim() == 1 for p in by_name["no_decay"]["params"]) and by_name["no_decay"]["weight_decay"] == 0.0
    assert scale_param_groups(model, 1e-4, 0.1, scale_lr_mult=0.1)[-1]["lr"] == pytest.approx(1e-5)
    torch.optim.AdamW(groups)   # a valid optimizer spec


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_is_bit_exact_and_codes_in_range(bits, dtype):
    torch.manual_seed(bits)
    model = nn.Sequential(nn.Linear(256, 16), nn.ReLU(), nn.Linear(96, 8, bias=False)).to(dtype)
    model[2] = nn.Linear(16, 8, bias=False).to(dtype)
    cfg = QuantConfig(bits=bits, include=(r"^\d+$",), exclude=(), log_scale_clamp=(-12.0, 0.0))
    replaced = prepare_qat(model, cfg)
    with torch.no_grad():                                 # shrink scales: codes hit both clamps
        replaced["0"].log_scale.sub_(0.5)
        replaced["2"].log_scale[0] = -14.0                # below the theta clamp
    ints = export_int_weights(model)
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for name, m in replaced.items():
        e = ints[name]
        assert e["bits"] == bits and e["group_size"] == m.group_size
        assert e["codes"].dtype == torch.int8 and e["codes"].shape == (m.out_features, m.in_features)
        assert e["scales"].dtype == torch.float32 and e["scales"].shape == (m.out_features, m.in_features // m.group_size)
        assert int(e["codes"].min()) >= qn and int(e["codes"].max()) <= qp
        rebuilt = e["codes"].float() * e["scales"].repeat_interleave(e["group_size"], dim=1)
        expect = fake_quantize(m.weight.detach().float(), m.log_scale.detach(), bits, m.group_size,
                               log_scale_clamp=cfg.log_scale_clamp)
        assert torch.equal(rebuilt, expect)
        assert (e["bias"] is None) == (m.bias is None)
    assert int(ints["0"]["codes"].min()) == qn and int(ints["0"]["codes"].max()) == qp
    assert float(ints["2"]["scales"][0, 0]) == pytest.approx(math.exp(-12.0))     # clamp applied in export too
    assert torch.equal(ints["0"]["bias"], model[0].bias.detach())


def test_bake_fake_quant_replaces_layers_and_keeps_outputs():
    model = tiny_qwen2vl(dtype=torch.bfloat16)
    replaced = prepare_qat(model, QuantConfig())
    ids = torch.randint(0, 400, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits_qat = model(input_ids=ids).logits
    expect = {n: fake_quantize(q.weight, q.log_scale, q.bits, q.group_size).detach() for n, q in replaced.items()}
    assert bake_fake_quant(model) == len(replaced)
    for n, w in expect.items():
        m = model.get_submodule(n)
        assert type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 and torch.equal(m.weight, w)
    assert not any(isinstance(m, QATLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits_qat)
    assert bake_fake_quant(model) == 0
