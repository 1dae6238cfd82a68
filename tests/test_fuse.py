"""Horizontal fusion of q/k/v and gate/up (grace_ds.export.fuse): same outputs, same tokens, one
Dynamo graph, nothing held between calls, and each member still its own projection."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from grace_ds.export.arch import bench_config
from grace_ds.export.decode import StaticDecoder
from grace_ds.export.fuse import FusedGroup, FusedPart, fuse_projections_
from grace_ds.export.load import DequantLinear, W4A16Linear
from tiny_serving import load_script, tiny_prompt, tiny_vlm

ARCHS = ["tiny-llava", "tiny-qwen2vl"]


def _model(arch: str, kind: str):
    if kind == "int4":
        cfg = bench_config(arch)
        return cfg, load_script("bench").build_int4(cfg, "cpu", torch.float32).eval()
    return tiny_vlm(arch)


def _tokens(model, cfg, inputs, s, n=5, compile_backend=None):
    dec = StaticDecoder(model, cfg, 2, s + n + 1, "cpu")
    dec.prefill(inputs)
    if compile_backend:
        dec.compiled = torch.compile(dec.step, backend=compile_backend, fullgraph=True)
    dec.run_steps(n)
    return dec.out[:, : n + 1].clone()


def _n_layers(cfg):
    return cfg.text_config.num_hidden_layers


@pytest.mark.parametrize("kind", ["float", "int4"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_model_matches_unfused(arch, kind):
    cfg, model = _model(arch, kind)
    inputs, s = tiny_prompt(cfg)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
        ref_tokens = _tokens(model, cfg, inputs, s)
        expected = sum(all(hasattr(m, c) for c in group) for m in model.modules()
                       for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")))
        n = fuse_projections_(model, glu=True)
        # every decoder layer has both groups (CLIP's attention has q/k/v too; Qwen2-VL's vision
        # blocks already use one qkv linear)
        assert n == expected >= 2 * _n_layers(cfg)
        groups = [m for m in model.modules() if isinstance(m, FusedGroup)]
        assert len(groups) == n
        lm = model.model.language_model
        lm_groups = [m for m in lm.modules() if isinstance(m, FusedGroup)]
        assert len(lm_groups) == 2 * _n_layers(cfg)
        want = W4A16Linear if kind == "int4" else nn.Linear
        assert all(isinstance(g.fused, want) for g in lm_groups)
        # glu=True: every decoder MLP (gated SiLU) now runs down_proj(fused_gate_up.glu(x))
        glu = [m for m in lm.modules() if "fused gate/up + SiLU" in type(m).__qualname__]
        assert len(glu) == _n_layers(cfg)
        logits = model(**inputs).logits
        tokens = _tokens(model, cfg, inputs, s)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens, ref_tokens)
    assert not any(g.pending() for g in groups)   # nothing held between calls
    assert fuse_projections_(model) == 0          # idempotent: fused groups are not fused again


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fold", [False, True])
def test_fused_decode_step_traces_as_one_graph(arch, fold):
    """The slices are handed out through module state: Dynamo must still see one graph, and the
    compiled step must make the eager tokens; with the RMSNorms folded in too (fold_norms_: the norm op)."""
    import torch._dynamo

    from grace_ds.export.fuse import fold_norms_

    cfg, model = _model(arch, "int4")
    inputs, s = tiny_prompt(cfg)
    with torch.no_grad():
        fuse_projections_(model, glu=fold)
        if fold:
            assert fold_norms_(model) == 2 * _n_layers(cfg)
        ref = _tokens(model, cfg, inputs, s)
        dec = StaticDecoder(model, cfg, 2, s + 6, "cpu")
        dec.prefill(inputs)
        torch._dynamo.reset()
        ex = torch._dynamo.explain(dec.step)()
        assert (ex.graph_count, ex.graph_break_count) == (1, 0), [str(b.reason) for b in ex.break_reasons]
        torch._dynamo.reset()
        tokens = _tokens(model, cfg, inputs, s, compile_backend="eager")
    assert torch.equal(tokens, ref)


def test_each_member_is_its_own_projection_whatever_the_call_order():
    """Members called out of order, with different inputs, or twice on one input still return
    their own projection of their own input (float64 reference)."""
    torch.manual_seed(0)
    parent = nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = nn.Linear(32, 16), nn.Linear(32, 8), nn.Linear(32, 8)
    ref = {k: (getattr(parent, k).weight.double().clone(), getattr(parent, k).bias.double().clone())
           for k in ("q_proj", "k_proj", "v_proj")}
    assert fuse_projections_(parent) == 1
    assert isinstance(parent.q_proj, FusedPart) and isinstance(parent.fused_qkv, FusedGroup)
    x1, x2, x3 = torch.randn(3, 32), torch.randn(3, 32), torch.randn(3, 32)

    def want(name, x):
        w, b = ref[name]
        return (x.double() @ w.t() + b).float()

    with torch.no_grad():
        calls = [("k_proj", x1), ("q_proj", x1), ("k_proj", x1), ("v_proj", x2), ("q_proj", x2),
                 ("v_proj", x1), ("q_proj", x1), ("k_proj", x1), ("q_proj", x3), ("k_proj", x3), ("v_proj", x3)]
        for name, x in calls:
            torch.testing.assert_close(getattr(parent, name)(x), want(name, x), rtol=1e-5, atol=1e-5)
    assert not parent.fused_qkv.pending()   # the last three calls served one group in full


def test_groups_of_mixed_kinds_or_widths_are_left_alone():
    codes = torch.randint(-8, 8, (16, 128), dtype=torch.int8)
    scales = torch.rand(16, 1) * 0.01
    parent = nn.Module()
    parent.gate_proj = nn.Linear(128, 16)
    parent.up_proj = DequantLinear(codes, scales, 4, 128)
    other = nn.Module()
    other.gate_proj, other.up_proj = nn.Linear(128, 16), nn.Linear(64, 16)
    assert fuse_projections_(parent) == 0 and fuse_projections_(other) == 0
    assert isinstance(parent.up_proj, DequantLinear) and isinstance(other.up_proj, nn.Linear)


def test_dequant_groups_fuse_codes_and_scales():
    torch.manual_seed(0)
    parent = nn.Module()
    mods = []
    for name, n in (("gate_proj", 32), ("up_proj", 48)):
        m = DequantLinear(torch.randint(-128, 128, (n, 256), dtype=torch.int8), torch.rand(n, 2) * 0.01, 8, 128)
        setattr(parent, name, m)
        mods.append(m)
    x = torch.randn(4, 256)
    with torch.no_grad():
        ref = [m(x) for m in mods]
        assert fuse_projections_(parent) == 1
        out = [parent.gate_proj(x), parent.up_proj(x)]
    assert isinstance(parent.fused_gate_up.fused, DequantLinear)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_gated_mlp_glu_forward_against_float64(act):
    """A transformers LlamaMLP of packed INT4 layers: after fusion (SiLU) its forward is one GLU call per
    MLP, equal to down(silu(gate x) * up x) in float64; another activation keeps the model's forward."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from grace_ds.export.load import quantized_linear

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=256, intermediate_size=384, hidden_act=act))
    w64 = {}
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(mlp, name)
        n, k = lin.weight.shape
        codes = torch.randint(-8, 8, (n, k), dtype=torch.int8)
        scales = (torch.rand(n, k // 128) * 0.01 + 0.005).bfloat16().float()   # exact after the kernel's 16-bit scales
        w64[name] = codes.double() * scales.double().repeat_interleave(128, 1)
        setattr(mlp, name, quantized_linear(codes, scales, 4, 128, None, torch.float32))
    x = torch.randn(2, 3, 256)
    act64 = torch.nn.functional.silu if act == "silu" else torch.nn.functional.gelu
    g, u = x.double() @ w64["gate_proj"].t(), x.double() @ w64["up_proj"].t()
    want = (act64(g) * u) @ w64["down_proj"].t()
    with torch.no_grad():
        before = mlp(x)
        assert fuse_projections_(mlp, glu=True) == 1
        swapped = "fused gate/up + SiLU" in type(mlp).__qualname__
        assert swapped == (act == "silu") and isinstance(mlp, LlamaMLP)
        calls = []
        orig = W4A16Linear.forward_glu
        W4A16Linear.forward_glu = lambda self, x: calls.append(1) or orig(self, x)
        try:
            got = mlp(x)
        finally:
            W4A16Linear.forward_glu = orig
    assert len(calls) == (1 if act == "silu" else 0)
    assert float((got.double() - want).norm() / want.norm()) < 1e-5
    torch.testing.assert_close(got, before, rtol=1e-5, atol=1e-5)


def test_glu_of_layers_the_kernel_cannot_fuse_falls_back_to_the_plain_forward():
    """forward_glu of a fused [gate; up] layer with a bias (added before the activation) or an I that is not a
    multiple of 16 tiles' pairs runs the layer, then the activation: the same numbers as the MLP's own code."""
    from grace_ds.export.load import quantized_linear

    torch.manual_seed(0)
    x = torch.randn(3, 256)
    for n, bias in ((96, torch.randn(96)), (48, None)):   # I = 48 with a bias; I = 24: not a multiple of 16
        codes = torch.randint(-8, 8, (n, 256), dtype=torch.int8)
        scales = torch.rand(n, 2) * 0.01 + 0.005
        lin = quantized_linear(codes, scales, 4, 128, bias, torch.float32)
        assert isinstance(lin, W4A16Linear)
        with torch.no_grad():
            gate, up = lin(x).chunk(2, dim=-1)
            torch.testing.assert_close(lin.forward_glu(x), torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_norms_give_the_unfolded_model(arch):
    """fold_norms_ moves every decoder layer's two RMSNorms into the fused packed q/k/v and gate/up layers after them
    (identities in their place): the same logits and greedy tokens, each fused layer now calling the norm op, the
    vision tower's norms untouched, and a second call finding nothing to move."""
    from grace_ds.export.fuse import fold_norms_

    cfg, model = _model(arch, "int4")
    inputs, s = tiny_prompt(cfg)
    calls = []
    import kernels.w4a16 as kw
    orig = kw.w4a16_gemm_norm
    with torch.no_grad():
        ref_logits = model(**inputs).logits
        ref_tokens = _tokens(model, cfg, inputs, s)
        fuse_projections_(model, glu=True)
        lm = model.model.language_model
        norms_before = sum("RMSNorm" in type(m).__name__ for m in lm.modules())
        assert fold_norms_(model) == 2 * _n_layers(cfg)
        assert sum("RMSNorm" in type(m).__name__ for m in lm.modules()) == norms_before - 2 * _n_layers(cfg) == 1  # final
        for layer in lm.layers:
            assert isinstance(layer.input_layernorm, nn.Identity) and isinstance(layer.post_attention_layernorm, nn.Identity)
            assert layer.self_attn.fused_qkv.fused._norm() is not None and layer.mlp.fused_gate_up.fused._norm() is not None
        kw.w4a16_gemm_norm = lambda *a, **k: calls.append(k.get("glu", False)) or orig(*a, **k)
        try:
            logits = model(**inputs).logits
            tokens = _tokens(model, cfg, inputs, s)
        finally:
            kw.w4a16_gemm_norm = orig
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens, ref_tokens)
    assert calls.count(True) == calls.count(False) > 0   # q/k/v plain, gate/up with the GLU epilogue, every layer
    assert fold_norms_(model) == 0


def test_norms_stay_where_the_projections_are_not_packed_int4():
    """A 16-bit model's fused projections are nn.Linear: nothing to fold into, every norm stays; and a norm that is
    not transformers' RMSNorm formula (here (1 + weight) scaling, as Gemma's) is not taken for one."""
    from grace_ds.export.fuse import _rms_norm_eps, fold_norms_

    cfg, model = _model("tiny-llava", "float")
    fuse_projections_(model)
    assert fold_norms_(model) == 0
    norm = model.model.language_model.layers[0].input_layernorm
    assert _rms_norm_eps(norm) == norm.variance_epsilon

    class OnePlus(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.weight, self.variance_epsilon, self.inner = inner.weight, inner.variance_epsilon, inner

        def forward(self, x):
            return self.inner(x) / self.weight * (1 + self.weight)

    assert _rms_norm_eps(OnePlus(norm)) is None and _rms_norm_eps(nn.LayerNorm(8)) is None


def test_bench_smoke_fuse_proj(tmp_path):
    rc = load_script("bench").main(["--smoke", "--in-process", "--arch", "tiny-qwen2vl", "--batch", "1", "--new-tokens", "3",
                        "--fuse-proj", "--json", str(tmp_path / "t.json")])
    assert rc == 0
    rc = load_script("bench").main(["--smoke", "--in-process", "--arch", "tiny-llava", "--batch", "1", "--new-tokens", "3",
                                    "--fuse-proj", "--glu", "--json", str(tmp_path / "g.json")])
    assert rc == 0
    res = json.loads((tmp_path / "g.json").read_text())
    assert [r.get("glu_mlps") for r in res["results"]] == [2, 2], res["results"]
    rc = load_script("bench").main(["--smoke", "--in-process", "--arch", "tiny-llava", "--batch", "1", "--new-tokens", "3",
                                    "--fuse-proj", "--fuse-norm", "--json", str(tmp_path / "n.json")])
    assert rc == 0
    res = json.loads((tmp_path / "n.json").read_text())
    assert [r.get("folded_norms") for r in res["results"]] == [None, 4], res["results"]   # INT4 only: 2 layers x 2
    with pytest.raises(SystemExit):
        load_script("bench").main(["--smoke", "--in-process", "--fuse-norm"])   # needs --fuse-proj


@pytest.mark.gpu
def test_gpu_fused_w4a16_equals_the_separate_kernels():
    """On the GPU the fused group runs the CUDA kernel at the summed N (6144 here, a shape the
    separate layers never use); its slices must match the separate layers' outputs, odd M too."""
    from grace_ds.export.load import quantized_linear

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    sizes = {"q_proj": 4096, "k_proj": 1024, "v_proj": 1024}
    separate, fused = nn.Module(), nn.Module()
    for name, n in sizes.items():
        codes = torch.randint(-8, 8, (n, 4096), generator=g, device="cuda", dtype=torch.int8)
        scales = torch.empty(n, 32, device="cuda").uniform_(0.003, 0.006, generator=g)
        setattr(separate, name, quantized_linear(codes, scales, 4, 128, None, torch.bfloat16))
        setattr(fused, name, quantized_linear(codes, scales, 4, 128, None, torch.bfloat16))
    assert separate.q_proj.backend == "kernels.w4a16"
    assert fuse_projections_(fused) == 1
    with torch.no_grad():
        for m in (1, 7, 16, 64, 300, 1024):
            x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
            for k in sizes:
                a, b = getattr(fused, k)(x).float(), getattr(separate, k)(x).float()
                assert ((a - b).norm() / b.norm()).item() < 1e-2, (m, k)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_gpu_bench_fused_replays_eager_tokens(tmp_path, mode):
    import json

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    rc = load_script("bench").main(["--in-process", "--arch", "tiny-llava", "tiny-qwen2vl", "--batch", "1", "4", "--new-tokens", "8",
                        "--visual-tokens", "16", "--text-tokens", "8", "--device", "cuda", "--mode", mode,
                        "--fuse-proj", "--json", str(tmp_path / "t.json")])
    res = json.loads((tmp_path / "t.json").read_text())["results"]
    assert rc == 0, res
    for r in res:
        assert r["fused_groups"] > 0
        for run in r["runs"]:
            assert run["mode"] == mode, (r["arch"], r["variant"], run)
            # tokens in graph mode; a compiled step rounds differently (test_kv8: its logits)
            assert mode == "compile" or run["graph_matches_eager"], (r["arch"], r["variant"], run)


@pytest.mark.gpu
def test_gpu_folded_norm_layers_equal_norm_then_layer():
    """On the GPU a fused packed layer with its RMSNorm folded in (W4A16Linear.set_norm) equals the norm, then the
    layer: at decode (the lean kernel with the fold where the op's choice has it, ext.norm_kernel says which) and
    at prefill sizes (the norm, then the op), plain and with the GLU epilogue, odd M, rows of very different
    scales, inside a CUDA graph too."""
    from grace_ds.export.load import quantized_linear, rms_norm

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from kernels.w4a16 import load_extension

    ext = load_extension()
    g = torch.Generator(device="cuda").manual_seed(0)
    K = 4096
    gamma = (torch.rand(K, device="cuda", generator=g) + 0.5).bfloat16()
    for n, glu in ((12288, False), (22016, True)):
        codes = torch.randint(-8, 8, (n, K), generator=g, device="cuda", dtype=torch.int8)
        scales = torch.empty(n, K // 128, device="cuda").uniform_(0.003, 0.006, generator=g)
        plain = quantized_linear(codes, scales, 4, 128, None, torch.bfloat16)
        folded = quantized_linear(codes, scales, 4, 128, None, torch.bfloat16)
        folded.set_norm(gamma, 1e-5)
        with torch.no_grad():
            for m in (1, 3, 16, 17, 300):
                x = (torch.randn(m, K, device="cuda", generator=g) * torch.logspace(-2, 2, m, device="cuda")[:, None]
                     ).bfloat16()
                xn = rms_norm(x, gamma, 1e-5)
                a = (folded.forward_glu(x) if glu else folded(x)).float()
                b = (plain.forward_glu(xn) if glu else plain(xn)).float()
                assert ((a - b).norm() / b.norm()).item() < 1e-2, (n, glu, m, ext.norm_kernel(m, n, K, glu))
            x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
            fn = (lambda t: folded.forward_glu(t)) if glu else folded
            want = fn(x).float()
            graph = torch.cuda.CUDAGraph()
            fn(x)
            with torch.cuda.graph(graph):
                out = fn(x)
            graph.replay()
            assert ((out.float() - want).norm() / want.norm()).item() < 1e-3, (n, glu)

