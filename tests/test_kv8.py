"""INT8 KV cache (grace_ds.export.kv8): rounding bound, attention against a float64 reference
(decode and prefill, GQA, every mask form), the whole model against the 16-bit cache, one Dynamo
graph for the decode step, and the memory it saves."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from grace_ds.export.arch import bench_config
from grace_ds.export.decode import StaticDecoder
from grace_ds.export.kv8 import (Int8StaticCache, _float_to_bytes, dequantize_kv, kv8_attention_forward,
                                 quantize_kv, split_kv)
from tiny_serving import kv8_reference, load_script, tiny_prompt, tiny_vlm

ARCHS = ["tiny-llava", "tiny-qwen2vl"]


def test_quantize_kv_rounds_to_nearest_with_a_per_vector_scale():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 64, dtype=torch.float64) * torch.rand(2, 3, 5, 1, dtype=torch.float64) * 10
    x[0, 0, 0] = 0.0                                   # an all-zero vector stays zero
    packed = quantize_kv(x)
    assert packed.dtype == torch.int8 and packed.shape == (2, 3, 6, 64)    # 5 rows of codes, 1 of scales
    codes, scale = split_kv(packed)
    assert codes.shape == (2, 3, 5, 64) and scale.shape == (2, 3, 5, 1)
    assert torch.equal(packed[:, :, 5, :20], _float_to_bytes(scale.float()).flatten(-2))   # the layout, byte for byte
    assert (packed[:, :, 5, 20:] == 0).all()
    s = x.abs().amax(-1, keepdim=True) / 127
    torch.testing.assert_close(scale.double(), s.float().double().clamp_min(1e-12 / 127), rtol=1e-6, atol=0)
    assert codes.abs().max() <= 127 and (codes.abs() == 127).any()
    err = (dequantize_kv(packed, torch.float64) - x).abs()
    assert (err <= scale.double() / 2 * (1 + 1e-5) + 1e-12).all()
    assert dequantize_kv(packed)[0, 0, 0].abs().max() == 0
    # 16-bit results are the fp32 product rounded once (the prefill's path: no fp32 copy of the cache)
    for dt in (torch.bfloat16, torch.float16):
        assert torch.equal(dequantize_kv(packed, dt), (codes.float() * scale).to(dt))
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_kv(torch.randn(2, 6, 3, 40))


def test_cache_length_inverts_the_row_count():
    """L + ceil(4 L / D) rows hold L positions, for every L: the attention recovers L from the shape."""
    from grace_ds.export.kv8 import cache_length, scale_rows

    for D in (16, 64, 128, 256):
        for L in range(0, 1200):
            assert cache_length(L + scale_rows(L, D), D) == L
    assert scale_rows(896, 128) == 28
    with pytest.raises(ValueError, match="not a packed cache"):
        cache_length(34, 128)         # 33 rows hold 32 positions, 35 hold 33: 34 is no packed cache


def test_scale_bytes_are_the_float_bytes_and_round_trip():
    """The scale's 4 bytes must be exactly the little-endian bytes of the fp32 value, and decode back
    bit for bit, over the whole exponent range, for transposed (non-contiguous) inputs too: eagerly
    (dtype views) and in the integer-arithmetic form used inside torch.compile (inductor cannot lower
    every float -> int8 view)."""
    from grace_ds.export.kv8 import _bytes_to_float, _bytes_to_float_arith, _float_to_bytes_arith

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4000, 1, generator=g) * torch.pow(2.0, torch.randint(-126, 127, (4000, 1), generator=g).float())
    x = torch.cat([x, torch.tensor([[1e-12], [127.0], [-3.5], [2.0 ** -149], [3.4e38]])])
    t = torch.randn(3, 5, 2, 1, generator=g).transpose(0, 2)          # last stride != 1 after the transpose
    for to_bytes, to_float in ((_float_to_bytes, _bytes_to_float), (_float_to_bytes_arith, _bytes_to_float_arith)):
        b = to_bytes(x)
        assert b.dtype == torch.int8 and torch.equal(b, x.view(torch.int8))
        assert torch.equal(to_float(b).view(torch.int32), x.view(torch.int32))
        assert torch.equal(to_float(to_bytes(t)), t)
        assert torch.equal(to_float(to_bytes(x).t().contiguous().t()), x)   # strided bytes decode too


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
@pytest.mark.parametrize("q_len", [1, 5])
def test_attention_matches_a_float64_reference(q_len, mask_kind):
    torch.manual_seed(1)
    B, H, Hk, L, D = 2, 8, 2, 24, 32
    mod = nn.Module()
    mod.num_key_value_groups, mod.is_causal = H // Hk, False   # masks are explicit here
    q = torch.randn(B, H, q_len, D)
    k, v = quantize_kv(torch.randn(B, Hk, L, D) * 3), quantize_kv(torch.randn(B, Hk, L, D))
    keep = torch.rand(B, 1, q_len, L) > 0.3
    keep[..., 0] = True
    mask = {"bool": keep, "additive": torch.where(keep, 0.0, -1e9), "none": None}[mask_kind]
    out, w = kv8_attention_forward(mod, q, k, v, mask, scaling=D ** -0.5)
    assert w is None and out.shape == (B, q_len, H, D)
    ref = kv8_reference(q, k, v, mask, D ** -0.5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def _run(model, cfg, kv_int8, n=6):
    inputs, s = tiny_prompt(cfg)
    dec = StaticDecoder(model, cfg, 2, s + n + 1, "cpu", kv_int8=kv_int8)
    dec.prefill(inputs)
    dec.run_steps(n)
    return dec, dec.out[:, : n + 1].clone()


@pytest.mark.parametrize("arch", ARCHS)
def test_model_with_int8_cache_decodes_like_the_16_bit_cache(arch):
    cfg, model = tiny_vlm(arch)
    with torch.no_grad():
        ref_dec, ref = _run(model, cfg, False)
        dec, got = _run(model, cfg, True)
        # layer 0's prompt keys/values see the same inputs in both runs (later layers and steps see
        # the rounding of earlier ones): the same vectors, rounded within the int8 bound
        l16, l8 = ref_dec.cache.layers[0], dec.cache.layers[0]
        n = tiny_prompt(cfg)[1]
        for a16, a8 in ((l16.keys, l8.keys), (l16.values, l8.values)):
            codes, scale = split_kv(a8)
            codes, scale = codes[:, :, :n], scale[:, :, :n]
            err = (codes.float() * scale - a16[:, :, :n]).abs()
            assert (err <= scale / 2 * (1 + 1e-4) + 1e-7).all()
    assert isinstance(dec.cache, Int8StaticCache)
    assert (got == ref).float().mean() >= 0.9, (got, ref)   # greedy tokens: near-ties may flip


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_cache_decode_step_traces_as_one_graph(arch):
    cfg, model = tiny_vlm(arch)
    with torch.no_grad():
        _assert_one_graph_and_eager_tokens(model, cfg)


def _assert_one_graph_and_eager_tokens(model, cfg):
    """The int8-cache decode step is one Dynamo graph, and the traced step makes the eager tokens."""
    import torch._dynamo

    dec, ref = _run(model, cfg, True)
    inputs, _ = tiny_prompt(cfg)
    dec.prefill(inputs)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(dec.step)()
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [str(b.reason) for b in ex.break_reasons]
    dec.prefill(inputs)
    torch._dynamo.reset()
    dec.compiled = torch.compile(dec.step, backend="eager", fullgraph=True)
    dec.run_steps(6)
    assert torch.equal(dec.out[:, :7], ref)


def test_int8_cache_memory():
    cfg, model = tiny_vlm("tiny-llava")
    with torch.no_grad():
        d16, _ = _run(model, cfg, False, n=2)
        d8, _ = _run(model, cfg, True, n=2)
    b16 = sum(t.numel() * t.element_size() for l in d16.cache.layers for t in (l.keys, l.values))
    b8 = sum(t.numel() * t.element_size() for l in d8.cache.layers for t in (l.keys, l.values))
    from grace_ds.export.kv8 import scale_rows

    B, Hk, L, D = d16.cache.layers[0].keys.shape
    # fp32 here (4 bytes per value); per position D code bytes, plus the scales' rows
    assert b16 == 2 * len(d16.cache.layers) * B * Hk * L * D * 4
    assert b8 == 2 * len(d8.cache.layers) * B * Hk * (L + scale_rows(L, D)) * D
    assert b8 / b16 <= (D + 4) / (4 * D) + D / (4 * D * L)


def test_bench_smoke_kv_int8(tmp_path, monkeypatch):
    import json
    import os

    monkeypatch.setenv("GRACE_KV8_TRITON", "1")   # restored after the test: --kv8-portable sets it
    bench = load_script("bench")
    rc = bench.main(["--smoke", "--in-process", "--arch", "tiny-llava", "--batch", "1", "--new-tokens", "3",
                     "--kv-int8", "--kv8-portable", "--json", str(tmp_path / "t.json"), "--out", str(tmp_path / "t.md")])
    res = json.loads((tmp_path / "t.json").read_text())["results"]
    assert rc == 0, res
    kinds = {r["variant"]: {run["kv_cache"] for run in r["runs"]} for r in res}
    assert kinds == {"bf16": {"16-bit"}, "int4": {"int8"}}
    assert {run["kv8_attention"] for r in res if r["variant"] == "int4" for run in r["runs"]} == {"portable"}
    assert os.environ["GRACE_KV8_TRITON"] == "0" and "the portable multiply + reduce form" in (tmp_path / "t.md").read_text()
    with pytest.raises(SystemExit, match="choose one"):
        bench.main(["--smoke", "--kv-int8", "--kv8-portable", "--kv8-triton"])


def test_bench_kv_int8_min_batch_keeps_small_batches_16bit(tmp_path, capsys):
    """--kv-int8-min-batch 2: batch 1 decodes over the 16-bit cache, batch 2 over the int8 one (int4
    variant only); a value without --kv-int8, or below 1, is refused naming it."""
    import json

    bench = load_script("bench")
    rc = bench.main(["--smoke", "--in-process", "--arch", "tiny-qwen2vl", "--batch", "1", "2", "--new-tokens", "3",
                     "--kv-int8", "--kv-int8-min-batch", "2", "--json", str(tmp_path / "t.json"),
                     "--out", str(tmp_path / "t.md")])
    res = json.loads((tmp_path / "t.json").read_text())["results"]
    assert rc == 0, res
    kinds = {r["variant"]: [(run["batch"], run["kv_cache"]) for run in r["runs"]] for r in res}
    assert kinds == {"bf16": [(1, "16-bit"), (2, "16-bit")], "int4": [(1, "16-bit"), (2, "int8")]}
    assert "from batch 2 on, 16-bit below" in (tmp_path / "t.md").read_text()
    for bad, msg in ((["--kv-int8-min-batch", "4"], "only means something with --kv-int8"),
                     (["--kv-int8", "--kv-int8-min-batch", "0"], "must be a batch size >= 1")):
        with pytest.raises(SystemExit):
            bench.main(["--smoke", *bad])
        assert msg in capsys.readouterr().err


def test_bench_kv_int8_auto_and_serving_preset(tmp_path, monkeypatch, capsys):
    """--serving turns on every option of the measured serving setup, with --kv-int8-auto: the int8 cache
    only for the batches whose 16-bit cache exceeds half the model's bytes (here batch 2, by stand-in
    sizes); the 16-bit cache formula gives the 7B models' known sizes; --kv-int8 with --kv-int8-auto is refused."""
    import json

    import torch

    from grace_ds.export.arch import bench_config

    bench = load_script("bench")
    # keys + values, every layer, bf16: LLaVA-1.5-7B (32 kv heads) 7.5 GB at batch 16 x 896 positions,
    # Qwen2-VL-7B (4 kv heads over 28 layers) 0.82 GB
    assert bench.cache16_bytes(bench_config("llava-1.5-7b"), 16, 896, torch.bfloat16) == 2 * 32 * 16 * 32 * 128 * 896 * 2
    assert bench.cache16_bytes(bench_config("qwen2-vl-7b"), 16, 896, torch.bfloat16) == 2 * 28 * 16 * 4 * 128 * 896 * 2
    monkeypatch.setattr(bench, "cache16_bytes", lambda config, batch, length, dtype: 100 * batch)
    monkeypatch.setattr(bench, "model_bytes", lambda model: 300)      # threshold 150: batch 2 only
    args = bench.parse_args(["--smoke", "--serving"])
    assert args.mode == "compile" and args.kv_int8_auto and not args.kv_int8 and args.prefill_tokens == 2048
    assert all(getattr(args, n) for n in ("int4_lm_head", "int8_embed", "int8_vision", "fuse_proj", "attn16_kernel",
                                           "pdl", "expandable_segments"))
    assert args.triton_pdl == "all" and bench.parse_args([]).triton_pdl is None
    assert bench.parse_args(["--serving", "--triton-pdl", "inductor"]).triton_pdl == "inductor"
    assert "--triton-pdl" in bench._forwarded(args)
    assert bench.parse_args(["--serving", "--mode", "graph", "--prefill-chunk", "64"]).mode == "graph"
    rc = bench.main(["--smoke", "--in-process", "--arch", "tiny-qwen2vl", "--batch", "1", "2", "--new-tokens", "3",
                     "--kv-int8-auto", "--json", str(tmp_path / "t.json"), "--out", str(tmp_path / "t.md")])
    res = json.loads((tmp_path / "t.json").read_text())["results"]
    assert rc == 0, res
    kinds = {r["variant"]: [(run["batch"], run["kv_cache"]) for run in r["runs"]] for r in res}
    assert kinds == {"bf16": [(1, "16-bit"), (2, "16-bit")], "int4": [(1, "16-bit"), (2, "int8")]}
    assert "(--kv-int8-auto): tiny-qwen2vl batch 1: 16-bit, tiny-qwen2vl batch 2: int8" in (tmp_path / "t.md").read_text()
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--kv-int8", "--kv-int8-auto"])
    assert "choose one" in capsys.readouterr().err


def test_bench_smoke_prefill_chunk(tmp_path, capsys):

    bench = load_script("bench")
    rc = bench.main(["--smoke", "--in-process", "--arch", "tiny-qwen2vl", "--batch", "2", "--new-tokens", "3",
                     "--prefill-chunk", "16", "--kv-int8", "--fuse-proj", "--out", str(tmp_path / "t.md")])
    assert rc == 0 and "prefill in chunks of 16 tokens" in (tmp_path / "t.md").read_text()
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--prefill-chunk", "0"])
    assert "--prefill-chunk 0: must be a positive number" in capsys.readouterr().err


def test_decode_attention_compiles_with_inductor():
    """Inductor (its C++ backend here; Triton on the GPU) lowers the int8 decode attention, the
    scale bytes' dtype view included, and gives the eager numbers."""
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor's CPU backend needs a C++ compiler")
    torch.manual_seed(2)
    B, H, Hk, L, D = 2, 8, 2, 40, 32
    mod = nn.Module()
    mod.num_key_value_groups, mod.is_causal = H // Hk, True
    q = torch.randn(B, H, 1, D)
    k, v = quantize_kv(torch.randn(B, Hk, L, D)), quantize_kv(torch.randn(B, Hk, L, D))
    keep = torch.rand(B, 1, 1, L) > 0.2
    keep[..., 0] = True

    def f(q, k, v, m):
        return kv8_attention_forward(mod, q, k, v, m, scaling=D ** -0.5)[0]

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, dynamic=False)(q, k, v, keep)
    torch.testing.assert_close(out, f(q, k, v, keep), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_gpu_bench_kv_int8(tmp_path, mode):
    """On the GPU: the int8-cache decode step captures (eager or inductor-compiled) and replays the
    eager tokens."""
    import json

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    bench = load_script("bench")
    rc = bench.main(["--in-process", "--arch", "tiny-llava", "tiny-qwen2vl", "--variants", "int4", "--batch", "1", "4",
                     "--new-tokens", "8", "--visual-tokens", "16", "--text-tokens", "8", "--device", "cuda",
                     "--mode", mode, "--kv-int8", "--json", str(tmp_path / "t.json")])
    res = json.loads((tmp_path / "t.json").read_text())["results"]
    assert rc == 0, res
    for r in res:
        for run in r["runs"]:
            assert run["kv_cache"] == "int8" and run["mode"] == mode, (r["arch"], run)
            # compiled steps round differently: tokens are checked in graph mode, logits in the test below
            assert mode == "compile" or run["graph_matches_eager"], (r["arch"], run)


@pytest.mark.parametrize("arch", ARCHS)
def test_all_serving_options_compose_in_one_graph(arch):
    """INT4 linears + INT4 lm_head + fused projections + INT8 KV cache together: the decode step is
    still one Dynamo graph and the compiled step makes the eager tokens."""
    from grace_ds.export.fuse import fuse_projections_
    from grace_ds.export.load import quantize_lm_head_

    bench = load_script("bench")
    cfg = bench_config(arch)
    model = bench.build_int4(cfg, "cpu", torch.float32).eval()
    with torch.no_grad():
        quantize_lm_head_(model)
        assert fuse_projections_(model) > 0
        _assert_one_graph_and_eager_tokens(model, cfg)


def test_composed_decode_step_compiles_with_inductor():
    """`--mode compile` for real (inductor's C++ backend here, Triton on the GPU): the INT4 model
    with INT4 head, fused projections and INT8 KV cache lowers (the W4A16 op through its fake
    kernel, the int8 attention, the scale views) and decodes the eager tokens, with inductor's PDL option on."""
    import shutil

    import torch._dynamo

    from grace_ds.export.fuse import fuse_projections_
    from grace_ds.export.load import quantize_lm_head_

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor's CPU backend needs a C++ compiler")
    bench = load_script("bench")
    cfg = bench_config("tiny-qwen2vl")
    model = bench.build_int4(cfg, "cpu", torch.float32).eval()
    with torch.no_grad():
        quantize_lm_head_(model)
        fuse_projections_(model)
        dec, ref = _run(model, cfg, True)
        dec.prefill(tiny_prompt(cfg)[0])
        torch._dynamo.reset()
        dec.compile(pdl=True)   # --triton-pdl's inductor option: accepted here, inert on the C++ backend
        dec.run_steps(6)
    assert torch.equal(dec.out[:, :7], ref)


def step_logits(dec) -> torch.Tensor:
    """The logits of one decode step of a StaticDecoder, in fp32: the cache is written as by a step, the
    decoder's token and position buffers are left as they are."""
    h = dec.lm(input_ids=dec.tok, position_ids=dec.pos, past_key_values=dec.cache, use_cache=True).last_hidden_state
    return dec.head(h[:, -1]).float()


@pytest.mark.gpu
@pytest.mark.parametrize("kv8_triton", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_compiled_step_logits_match_eager(arch, kv8_triton, monkeypatch):
    """On the GPU, all serving options at once (W4A16 kernel, INT4 head, int8 embeddings, fused
    projections, INT8 KV cache): the inductor-compiled decode step (Triton) computes the eager step's logits, to bf16
    tolerance. Greedy tokens of random tiny models are too close to ties for token equality to
    judge a compiled step (its fusions round differently), so the bench tests check tokens in graph
    mode only and this test checks the compiled numbers."""
    import torch._dynamo

    from grace_ds.export.arch import make_prompt
    from grace_ds.export.decode import StaticDecoder
    from grace_ds.export.fuse import fuse_projections_
    from grace_ds.export.load import quantize_embeddings_, quantize_lm_head_

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if kv8_triton:
        pytest.importorskip("triton")
    # the attention as one Triton kernel (kv8_triton.py, the default), or the portable form
    monkeypatch.setenv("GRACE_KV8_TRITON", "1" if kv8_triton else "0")
    bench = load_script("bench")
    cfg = bench_config(arch)
    model = bench.build_int4(cfg, "cuda", torch.bfloat16).eval()

    with torch.no_grad():
        quantize_lm_head_(model)
        quantize_embeddings_(model)
        assert fuse_projections_(model) > 0
        inputs = make_prompt(cfg, 4, 8, 16, device="cuda", dtype=torch.bfloat16)
        dec = StaticDecoder(model, cfg, 4, inputs["input_ids"].shape[1] + 8, "cuda", kv_int8=True)
        dec.prefill(inputs)
        dec.run_steps(3)                  # a few cached tokens written by the step itself
        st = dec._state()
        ref = step_logits(dec)
        dec._restore(st)
        torch._dynamo.reset()
        out = torch.compile(step_logits, dynamic=False)(dec)
    assert ((out - ref).norm() / ref.norm()).item() < 3e-2


def test_attention_benchmark_smoke(capsys):
    """benchmarks/bench_kv8_attention.py on the CPU (tiny shapes): every method runs and matches its
    float64 reference (the script exits with an error above 2e-2)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kv8_attention.py"
    spec = importlib.util.spec_from_file_location("bench_kv8_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--small"])
    out = capsys.readouterr().out
    assert out.count("| sdpa16 |") == 4 and out.count("| kv8-portable |") == 4
    # a prefill's host cost, counted: the int8 cache adds 56 aten calls per layer (124 when its eager
    # scale conversions were integer arithmetic, as compiled steps still do)
    (_, n16), (_, n8) = bench.main(["--count-prefill"])
    assert 0 < n8 - n16 <= 2 * 64, (n16, n8)


def test_compiled_cache_update_writes_in_place():
    """A compiled decode step must write only the new position into the cache: through views of the
    packed tensor, inductor copied the whole cache at every step (measured on an H200: LLaVA-7B's
    batch-1 step 2.7 -> 3.6 ms). No buffer the generated code allocates may be cache-sized."""
    import re
    import shutil

    from torch._inductor.utils import run_and_get_code

    from grace_ds.export.kv8 import Int8StaticLayer

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor's CPU backend needs a C++ compiler")
    B, Hk, L, D = 2, 4, 512, 64
    layer = Int8StaticLayer(max_cache_len=L)
    layer.update(torch.randn(B, Hk, 10, D), torch.randn(B, Hk, 10, D))
    k, v = torch.randn(B, Hk, 1, D), torch.randn(B, Hk, 1, D)

    def step(k, v):
        layer.update(k, v)
        return k.sum()

    torch._dynamo.reset()
    _, code = run_and_get_code(torch.compile(step, fullgraph=True), k, v)
    sizes = [eval(m) for m in re.findall(r"empty_strided_\w+\((\([\d, ]*\))", "\n".join(code))]
    largest = max((torch.Size(s).numel() for s in sizes), default=0)
    assert largest < B * Hk * D * 8, (largest, sizes)
    codes, scale = split_kv(layer.keys)          # and the step wrote the right values
    torch.testing.assert_close(codes[:, :, 10].float() * scale[:, :, 10], k[:, :, 0], atol=scale.max().item(), rtol=0)
    assert (codes[:, :, 11:] == 0).all()


@pytest.mark.parametrize("chunk", [None, 7])
def test_prefill_attends_to_the_written_prefix_only(chunk, monkeypatch):
    """A prompt pass after a reset gets the positions written so far, dequantised (not the whole static
    cache): the same first token and cache as the whole-cache path, in one pass or in chunks; a decode
    step ends the host-side count, so later multi-token passes take the whole-cache path again."""
    import grace_ds.export.kv8 as kv8

    cfg, model = tiny_vlm("tiny-qwen2vl")
    inputs, s = tiny_prompt(cfg)
    seen = []
    orig = kv8.dequantize_kv
    monkeypatch.setattr(kv8, "dequantize_kv", lambda t, dt, n=None: seen.append(n) or orig(t, dt, n))
    with torch.no_grad():
        fast = StaticDecoder(model, cfg, 2, s + 6, "cpu", kv_int8=True)
        fast.prefill(inputs, chunk=chunk)
        n_layers = len(fast.cache.layers)
        steps = [s] if chunk is None else [min(s, a + chunk) for a in range(0, s, chunk)]
        assert seen == [n for n in steps for _ in range(n_layers) for _ in range(2)]
        monkeypatch.setattr(kv8.Int8StaticLayer, "reset", lambda self: (kv8.StaticLayer.reset(self),
                                                                         setattr(self, "written", None)))
        slow = StaticDecoder(model, cfg, 2, s + 6, "cpu", kv_int8=True)
        slow.prefill(inputs, chunk=chunk)
        assert torch.equal(fast.out[:, 0], slow.out[:, 0])
        for a, b in zip(fast.cache.layers, slow.cache.layers):
            (ca, sa), (cb, sb) = split_kv(a.keys), split_kv(b.keys)
            torch.testing.assert_close(ca.float() * sa, cb.float() * sb, rtol=0, atol=2 * sa.max().item())
        fast.run_steps(2)
        assert all(layer.written is None for layer in fast.cache.layers)


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_cache_works_with_generate(arch):
    """The cache and its attention outside StaticDecoder: transformers' own `generate` with an
    Int8StaticCache gives StaticDecoder's greedy tokens."""
    from grace_ds.export.kv8 import enable_kv_int8

    cfg, model = tiny_vlm(arch)
    inputs, s = tiny_prompt(cfg)
    with torch.no_grad():
        dec, ref = _run(model, cfg, True, n=6)
        enable_kv_int8(model)
        cache = Int8StaticCache(config=model.config, max_cache_len=s + 7)
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=7, do_sample=False)
    assert torch.equal(out[:, s:], ref)


def test_decode16_falls_back_to_sdpa_without_the_kernel():
    """--attn16-kernel's attention function: where the kernel cannot run (here a CPU tensor, no
    Triton interpreter) it is transformers' SDPA function exactly, for decode and prompt passes, and a
    decoder built with it gives the default decoder's tokens."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from grace_ds.export.decode import StaticDecoder
    from grace_ds.export.kv8 import NAME16, decode16_attention_forward

    g = torch.Generator().manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    for q_len in (1, 5):
        q = torch.randn(2, 4, q_len, 32, generator=g)
        k, v = torch.randn(2, 2, 9, 32, generator=g), torch.randn(2, 2, 9, 32, generator=g)
        mask = torch.rand(2, 1, q_len, 9, generator=g) > 0.3
        mask[..., 0] = True
        got, _ = decode16_attention_forward(module, q, k, v, mask, scaling=0.2)
        want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.2)
        assert torch.equal(got, want)
    cfg, model = tiny_vlm("tiny-qwen2vl")
    inputs, s = tiny_prompt(cfg)
    with torch.no_grad():
        ref = StaticDecoder(model, cfg, 2, s + 6, "cpu")
        ref.prefill(inputs)
        ref.run_steps(4)
        dec = StaticDecoder(model, cfg, 2, s + 6, "cpu", decode_kernel16=True)
        assert model.config.get_text_config(decoder=True)._attn_implementation == NAME16
        dec.prefill(inputs)
        dec.run_steps(4)
    assert torch.equal(dec.out[:, :5], ref.out[:, :5])


def test_bench_smoke_attn16_kernel(tmp_path, monkeypatch):
    import json
    import os

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512,expandable_segments:False")
    bench = load_script("bench")
    rc = bench.main(["--smoke", "--in-process", "--arch", "tiny-llava", "--batch", "1", "--new-tokens", "3",
                     "--attn16-kernel", "--expandable-segments", "--json", str(tmp_path / "t.json"),
                     "--out", str(tmp_path / "t.md")])
    # the workers' allocator setting: the user's other options kept, expandable segments turned on
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512,expandable_segments:True"
    assert "--expandable-segments" in (tmp_path / "t.md").read_text()
    res = json.loads((tmp_path / "t.json").read_text())["results"]
    assert rc == 0, res
    # both variants asked for the kernel; on the CPU without Triton both fell back to SDPA, and say so
    assert {run["decode_attention"] for r in res for run in r["runs"]} == {"sdpa"}
    assert "decode attention over 16-bit caches: transformers' SDPA" in (tmp_path / "t.md").read_text()


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_decode16_compiled_step_matches_sdpa(arch):
    """On the GPU the 16-bit decode kernel (--attn16-kernel) inside an inductor-compiled step gives the
    logits of the eager step with transformers' SDPA, for MHA (LLaVA) and GQA (Qwen2-VL)."""
    import torch._dynamo

    from grace_ds.export.arch import make_prompt
    from grace_ds.export.decode import StaticDecoder

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton")
    bench = load_script("bench")
    cfg = bench_config(arch)

    outs = []
    for kernel in (False, True):
        torch.manual_seed(0)
        model = bench.build_bf16(cfg, "cuda", torch.bfloat16).eval()
        with torch.no_grad():
            inputs = make_prompt(cfg, 4, 8, 16, device="cuda", dtype=torch.bfloat16, seed=0)
            dec = StaticDecoder(model, cfg, 4, inputs["input_ids"].shape[1] + 8, "cuda", decode_kernel16=kernel)
            dec.prefill(inputs)           # the prompt pass is SDPA in both: the same cache for the first step
            torch._dynamo.reset()
            outs.append(torch.compile(step_logits, dynamic=False)(dec) if kernel else step_logits(dec))
    ref, out = outs
    assert ((out - ref).norm() / ref.norm()).item() < 3e-2


def test_prefill_token_budget(tmp_path):
    """--prefill-tokens: one pass while batch x prompt fits the budget, else budget // batch per row;
    the bench records the choice per run and rejects both chunk options at once."""
    import json

    from grace_ds.export.decode import chunk_for_budget

    assert chunk_for_budget(1, 640, 2048) is None and chunk_for_budget(16, 640, 2048) == 128
    assert chunk_for_budget(3, 100, None) is None and chunk_for_budget(4000, 10, 2048) == 1
    bench = load_script("bench")
    with pytest.raises(SystemExit):
        bench.parse_args(["--smoke", "--prefill-chunk", "8", "--prefill-tokens", "64"])
    out = tmp_path / "t.json"
    assert bench.main(["--smoke", "--in-process", "--arch", "tiny-llava", "--variants", "bf16", "--batch", "1", "2",
                       "--new-tokens", "3", "--prefill-tokens", "40", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["results"][0]["runs"]
    assert [r["prompt_len"] for r in runs] == [24, 24]                    # the smoke prompt
    assert [r["prefill_chunk"] for r in runs] == [None, 20]              # 24 <= 40: one pass; 48 > 40: 40 // 2
