"""Export: packing layouts (grace + AutoAWQ GEMM), verified conversion, packed-model loader, decoding.

The final export dir is fabricated here the way architecture.md describes it (config.json with
grace_quantization, model.safetensors with the latent weights, int_weights.safetensors from
export_int_weights) from a tiny LLaVA with QAT, so these tests do not depend on the trainer.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from grace_ds.export.arch import bench_config, make_prompt
from grace_ds.export.convert import ConversionError, convert_checkpoint
from grace_ds.export.load import DequantLinear, PackedMetadataError, W4A16Linear, load_packed_model
from grace_ds.export.pack import (
    AWQ_ORDER,
    PackError,
    from_awq,
    pack_grace,
    pack_int4,
    to_awq,
    unpack_grace,
    unpack_int4,
)
from tiny_serving import load_script, tiny_prompt, tiny_vlm


# ----------------------------------------------------------------------------- AutoAWQ, restated
# Independent restatement of AutoAWQ's WQLinear_GEMM.from_linear packing loop and of its
# utils/packing_utils.unpack_awq + reverse_awq_order, written as loops like the original.

def autoawq_pack(intweight_out_in: torch.Tensor, zeros_groups_out: torch.Tensor):
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    intweight = intweight_out_in.t().contiguous().to(torch.int32)  # (in, out)
    qweight = torch.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=torch.int32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + order_map[i]] << (i * 4)
    zeros = zeros_groups_out.to(torch.int32)
    qzeros = torch.zeros((zeros.shape[0], zeros.shape[1] // 8), dtype=torch.int32)
    for col in range(zeros.shape[1] // 8):
        for i in range(8):
            qzeros[:, col] |= zeros[:, col * 8 + order_map[i]] << (i * 4)
    return qweight, qzeros


def autoawq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor):
    shifts = torch.arange(0, 32, 4)
    iw = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8).view(qweight.shape[0], -1)
    iz = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8).view(qzeros.shape[0], -1)
    reverse = torch.arange(iw.shape[-1]).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].view(-1)
    iw, iz = iw[:, reverse], iz[:, torch.arange(iz.shape[-1]).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].view(-1)]
    return torch.bitwise_and(iw, 0xF), torch.bitwise_and(iz, 0xF)  # (in, out), (in/g, out)


def _random_layer(n=32, k=256, g=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), generator=gen).to(torch.int8)
    codes[0, :16] = torch.arange(-8, 8, dtype=torch.int8)  # every code value appears
    scales = torch.rand(n, k // g, generator=gen) * 0.01 + 1e-3
    return codes, scales


def test_awq_layout_matches_autoawq_bit_for_bit():
    codes, scales = _random_layer()
    qweight, qzeros, s16 = to_awq(codes, scales, 128)
    ref_qw, ref_qz = autoawq_pack(codes.to(torch.int32) + 8, torch.full((2, 32), 8))
    assert qweight.dtype == torch.int32 and qweight.shape == (256, 4) and torch.equal(qweight, ref_qw)
    assert qzeros.dtype == torch.int32 and qzeros.shape == (2, 4) and torch.equal(qzeros, ref_qz)
    assert s16.dtype == torch.float16 and s16.shape == (2, 32) and torch.equal(s16, scales.half().t())
    # AutoAWQ's own unpack gives q_awq = codes + 8 and zeros 8; its dequant equals codes * s exactly
    iw, iz = autoawq_unpack(qweight, qzeros)
    assert torch.equal(iw.to(torch.int16), codes.t().to(torch.int16) + 8) and bool((iz == 8).all())
    w_awq = (iw.float() - iz.float().repeat_interleave(128, 0)) * s16.float().repeat_interleave(128, 0)
    assert torch.equal(w_awq, codes.t().float() * s16.float().repeat_interleave(128, 0))
    # and our inverse gives the codes and the (fp16) scales back bit for bit
    c2, s2 = from_awq(qweight, qzeros, s16, 128)
    assert torch.equal(c2, codes) and torch.equal(s2, scales.half())
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)


def test_grace_layout_round_trip_and_errors():
    codes, scales = _random_layer(16, 128, 64)
    p = pack_grace(codes, scales, 4, 64)
    assert p["qweight"].dtype == torch.uint8 and p["qweight"].shape == (16, 64)
    assert int(p["qweight"][0, 0]) == ((-7 + 8) << 4) | (-8 + 8)  # column 0 (-8) low nibble, 1 (-7) high
    c2, s2 = unpack_grace(p["qweight"], p["scales"], 4)
    assert torch.equal(c2, codes) and torch.equal(s2, scales)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)
    c8 = torch.randint(-128, 128, (16, 128)).to(torch.int8)
    p8 = pack_grace(c8, scales, 8, 64)
    assert torch.equal(unpack_grace(p8["qweight"], p8["scales"], 8)[0], c8)
    with pytest.raises(PackError, match=r"outside the 4-bit grid \[-8, 7\]"):
        pack_grace(c8, scales, 4, 64)
    with pytest.raises(PackError, match="scales shape"):
        pack_grace(codes, scales[:, :1], 4, 64)
    with pytest.raises(PackError, match="out_features 12 .* multiple of 8"):
        to_awq(codes[:12], scales[:12], 64)


# ----------------------------------------------------------------------------- fabricated final export

def _qat_model(arch="tiny-llava", bits=4, group_size=128, seed=0):
    import transformers

    from grace_ds.quant import QuantConfig, prepare_qat

    cfg = bench_config(arch)
    torch.manual_seed(seed)
    model = getattr(transformers, cfg.architectures[0])._from_config(cfg, dtype=torch.float32).eval()
    qc = QuantConfig(bits=bits, group_size=group_size)
    layers = prepare_qat(model, qc)
    with torch.no_grad():  # move the scales off their init so the test is not about init only
        for m in layers.values():
            m.log_scale.add_(torch.randn_like(m.log_scale) * 0.05)
    return cfg, model, qc, list(layers)


def write_final_dir(out: Path, cfg, model, qc, layers) -> Path:
    """The trainer's final export layout (architecture.md, grace_ds.engine.export): 16-bit latent weights
    (an fp32-trained model is cast to bf16, its codes come from the fp32 weights) + int_weights + config."""
    from grace_ds.quant import export_int_weights

    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
          if not k.endswith("log_scale")}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    c = cfg.to_dict()
    c["grace_quantization"] = dict(qc.to_dict(), layers=layers)
    (out / "config.json").write_text(json.dumps(c))
    ints = export_int_weights(model)
    iw = {}
    for name, e in ints.items():
        iw[f"{name}.codes"], iw[f"{name}.scales"] = e["codes"], e["scales"]
    save_file(iw, str(out / "int_weights.safetensors"), metadata={"bits": str(qc.bits), "group_size": str(qc.group_size)})
    (out / "tokenizer_config.json").write_text("{}")  # stands in for the processor files
    return out


@pytest.fixture(scope="module")
def llava4(tmp_path_factory):
    cfg, model, qc, layers = _qat_model()
    d = write_final_dir(tmp_path_factory.mktemp("final") / "final", cfg, model, qc, layers)
    inputs = make_prompt(cfg, 2, 6, dtype=torch.float32)
    with torch.no_grad():
        ref = model(**inputs).logits
    return dict(dir=d, cfg=cfg, layers=layers, inputs=inputs, ref=ref)


def test_convert_grace_verifies_and_loads(llava4, tmp_path):
    out = tmp_path / "packed"
    logs = []
    reports = convert_checkpoint(llava4["dir"], out, "grace", progress=False, log=logs.append)
    assert len(reports) == len(llava4["layers"]) == 14
    # fp32 weights exported as bf16 latents: a few codes sit within half a bf16 ulp of a rounding
    # boundary; they are explained (counted), never unexplained
    assert all(r.unexplained == 0 and r.max_code_error <= 1 and r.roundtrip_ok and r.path == "kernel" for r in reports)
    n_mism = sum(r.code_mismatches for r in reports)
    assert 0 < n_mism < 0.01 * sum(r.shape[0] * r.shape[1] for r in reports)  # seed 0: 1212 of 393216
    assert "| layer |" in logs[0] and "0 layers failed" in logs[1]
    cfg = json.loads((out / "config.json").read_text())
    packed = cfg["grace_packed"]
    assert packed["format"] == "grace" and packed["bits"] == 4 and packed["group_size"] == 128
    assert sorted(packed["layers"]) == sorted(llava4["layers"]) and cfg["grace_quantization"]["bits"] == 4
    assert (out / "tokenizer_config.json").exists() and not list(out.glob(".*tmp"))
    name = llava4["layers"][0]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor(f"{name}.qweight").dtype == torch.uint8 and f"{name}.weight" not in f.keys()
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16  # non-quantised: 16-bit
    iw = load_file(str(llava4["dir"] / "int_weights.safetensors"))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for n in llava4["layers"]:  # stored codes == QAT export, bit for bit
            assert torch.equal(unpack_int4(f.get_tensor(f"{n}.qweight")), iw[f"{n}.codes"])
            assert torch.equal(f.get_tensor(f"{n}.scales"), iw[f"{n}.scales"])

    # exact oracle: dequantise path in fp32 == the fake-quant model (16-bit copies of the other tensors
    # are the only difference: bf16 rounding of embeddings / vision / lm_head)
    m = load_packed_model(out, dtype=torch.float32, force_dequant=True)
    assert all(isinstance(m.get_submodule(n), DequantLinear) for n in llava4["layers"])
    with torch.no_grad():
        got = m(**llava4["inputs"]).logits
    ref = llava4["ref"]
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
    # kernel path (reference op on CPU): the kernel takes 16-bit scales, a further bf16 rounding
    mk = load_packed_model(out, dtype=torch.float32)
    assert all(isinstance(mk.get_submodule(n), W4A16Linear) for n in llava4["layers"])
    with torch.no_grad():
        got_k = mk(**llava4["inputs"]).logits
    assert (got_k - ref).abs().max() <= 3e-2 * ref.abs().max()
    assert (got_k.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    # fused q/k/v and gate/up: the same products in fewer GEMMs
    mf = load_packed_model(out, dtype=torch.float32, fuse_projections=True)
    assert sum(type(m).__name__ == "FusedGroup" for m in mf.modules()) >= 2
    with torch.no_grad():
        got_f = mf(**llava4["inputs"]).logits
    torch.testing.assert_close(got_f, got_k, rtol=1e-4, atol=1e-4)


def test_exact_logits_when_nonquantised_tensors_are_16bit(tmp_path):
    """With a model whose every tensor is bf16-representable, the dequant path reproduces the
    fake-quant logits to fp32 rounding: the packed weights are exactly codes * s."""
    cfg, model, qc, layers = _qat_model("tiny-qwen2vl", seed=1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not n.endswith("log_scale"):
                p.copy_(p.to(torch.bfloat16).float())
    d = write_final_dir(tmp_path / "final", cfg, model, qc, layers)
    reports = convert_checkpoint(d, tmp_path / "packed", "grace", progress=False, log=lambda s: None)
    assert all(r.code_mismatches == 0 and r.max_code_error == 0 for r in reports)  # exact: latents are bf16
    m = load_packed_model(tmp_path / "packed", dtype=torch.float32, force_dequant=True)
    inputs = make_prompt(cfg, 1, 6, 16, dtype=torch.float32)
    with torch.no_grad():
        ref, got = model(**inputs).logits, m(**inputs).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_tampered_codes_fail_verification(llava4, tmp_path):
    d = tmp_path / "tampered"
    shutil.copytree(llava4["dir"], d)
    iw = load_file(str(d / "int_weights.safetensors"))
    name = llava4["layers"][3]
    codes = iw[f"{name}.codes"].clone()
    codes[1, 5] = codes[1, 5] + 2 if codes[1, 5] < 6 else codes[1, 5] - 2  # 16-bit rounding moves at most 1
    iw[f"{name}.codes"] = codes
    save_file(iw, str(d / "int_weights.safetensors"), metadata={"bits": "4", "group_size": "128"})
    with pytest.raises(ConversionError, match=rf"verification failed, nothing written: {name}: 1 codes differ \(max 2\)"):
        convert_checkpoint(d, tmp_path / "out", "grace", progress=False, log=lambda s: None)
    assert not (tmp_path / "out" / "config.json").exists()


def test_awq_checkpoint(llava4, tmp_path):
    out = tmp_path / "awq"
    reports = convert_checkpoint(llava4["dir"], out, "awq", progress=False, log=lambda s: None)
    assert all(r.ok and r.scale_rel_err < 2**-10 for r in reports)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "zero_point", "version")} == \
        {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    assert "lm_head" in qc["modules_to_not_convert"] and "model.vision_tower" in qc["modules_to_not_convert"]
    assert not any(n.startswith(p) for p in qc["modules_to_not_convert"] for n in llava4["layers"])
    import transformers

    assert transformers.AwqConfig.from_dict(qc).bits == 4  # transformers' AWQ config accepts it
    iw = load_file(str(llava4["dir"] / "int_weights.safetensors"))
    f = load_file(str(out / "model.safetensors"))
    for n in llava4["layers"]:
        c, s = from_awq(f[f"{n}.qweight"], f[f"{n}.qzeros"], f[f"{n}.scales"], 128)
        assert torch.equal(c, iw[f"{n}.codes"]) and torch.equal(s, iw[f"{n}.scales"].half())
    m = load_packed_model(out, dtype=torch.float32)
    with torch.no_grad():
        got = m(**llava4["inputs"]).logits
    assert (got - llava4["ref"]).abs().max() <= 3e-2 * llava4["ref"].abs().max()


# ----------------------------------------------------------------------------- bad inputs

def test_error_no_qat_scales(llava4, tmp_path):
    d = tmp_path / "plain"
    shutil.copytree(llava4["dir"], d)
    (d / "int_weights.safetensors").unlink()
    with pytest.raises(ConversionError, match="int_weights.safetensors missing: .*quant.enabled=true"):
        convert_checkpoint(d, tmp_path / "o", progress=False)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["grace_quantization"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="no grace_quantization in config.json"):
        convert_checkpoint(d, tmp_path / "o", progress=False)


def test_error_bits_and_format(llava4, tmp_path):
    with pytest.raises(ConversionError, match="--bits 8: the checkpoint was trained with 4-bit"):
        convert_checkpoint(llava4["dir"], tmp_path / "o", bits=8, progress=False)
    with pytest.raises(ConversionError, match="--format 'gptq': choose one of"):
        convert_checkpoint(llava4["dir"], tmp_path / "o", "gptq", progress=False)


def test_group_size_kernel_cannot_take_and_8bit(tmp_path):
    cfg, model, qc, layers = _qat_model(group_size=64, seed=2)
    d = write_final_dir(tmp_path / "g64", cfg, model, qc, layers)
    with pytest.raises(ConversionError, match=r"q_proj \(128x128, 4-bit, group 64\): the W4A16 kernel cannot take it: "
                                              r"group_size 64 != 128.*--allow-dequant"):
        convert_checkpoint(d, tmp_path / "o", progress=False, log=lambda s: None)
    reports = convert_checkpoint(d, tmp_path / "o", allow_dequant=True, progress=False, log=lambda s: None)
    assert all(r.path.startswith("dequant") and r.ok for r in reports)
    m = load_packed_model(tmp_path / "o", dtype=torch.float32)
    assert all(isinstance(m.get_submodule(n), DequantLinear) for n in layers)

    cfg, model, qc, layers = _qat_model(bits=8, seed=3)
    d8 = write_final_dir(tmp_path / "b8", cfg, model, qc, layers)
    with pytest.raises(ConversionError, match="AWQ GEMM checkpoints are 4-bit"):
        convert_checkpoint(d8, tmp_path / "o8", "awq", progress=False)
    convert_checkpoint(d8, tmp_path / "o8", progress=False, log=lambda s: None)
    with safe_open(str(tmp_path / "o8" / "model.safetensors"), "pt") as f:
        assert f.get_tensor(f"{layers[0]}.qweight").dtype == torch.int8
    m8 = load_packed_model(tmp_path / "o8", dtype=torch.float32)
    inputs = make_prompt(cfg, 1, 6, dtype=torch.float32)
    with torch.no_grad():
        ref, got = model(**inputs).logits, m8(**inputs).logits
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_packed_metadata_mismatch(llava4, tmp_path):
    out = tmp_path / "p"
    convert_checkpoint(llava4["dir"], out, progress=False, log=lambda s: None)
    cfg_text = (out / "config.json").read_text()
    name = llava4["layers"][0]

    cfg = json.loads(cfg_text)
    cfg["grace_packed"]["layers"][name]["shape"] = [64, 128]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PackedMetadataError, match=rf"{name}: packed as 64x128 but the model has \(128, 128\)"):
        load_packed_model(out)

    cfg = json.loads(cfg_text)
    cfg["grace_packed"]["layers"]["model.language_model.layers.9.mlp.up_proj"] = {"shape": [384, 128], "bits": 4, "group_size": 128}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PackedMetadataError, match="do not exist in the model"):
        load_packed_model(out)

    cfg = json.loads(cfg_text)
    del cfg["grace_packed"]["layers"][name]  # file holds qweight/scales the model has no place for
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PackedMetadataError, match=rf"holds '{name}.qweight'"):
        load_packed_model(out)

    cfg = json.loads(cfg_text)
    del cfg["grace_packed"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PackedMetadataError, match="not a packed checkpoint.*launch/convert.py"):
        load_packed_model(out)


# ----------------------------------------------------------------------------- CLIs and decoding

def test_convert_cli(llava4, tmp_path, capsys):
    convert = load_script("convert")
    rc = convert.main(["--checkpoint", str(llava4["dir"]), "--out", str(tmp_path / "cli"), "--format", "awq",
                       "--bits", "auto", "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0 and "0 layers failed" in out.out and (tmp_path / "cli" / "config.json").exists()
    rc = convert.main(["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "no config.json" in err and "Traceback" not in err


@pytest.mark.parametrize("arch", ["tiny-llava", "tiny-qwen2vl"])
def test_static_decoder_matches_generate(arch):
    from grace_ds.export.decode import StaticDecoder

    cfg, model = tiny_vlm(arch)
    inputs, s = tiny_prompt(cfg)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)[:, s:]
        dec = StaticDecoder(model, cfg, 2, s + 6, "cpu")
        dec.prefill(inputs)
        dec.run_steps(5)
    assert torch.equal(dec.out[:, :6], ref)


def test_static_decoder_records_how_close_each_argmax_was():
    """dec.margins = []: each eager step records (top logit, gap to the second) per row, the numbers
    generate()'s scores give (float64 oracle); None: nothing recorded, and a compiled step never records.
    bench turns a gap into a verdict on a replay / eager token mismatch."""
    from grace_ds.export.decode import StaticDecoder

    cfg, model = tiny_vlm("tiny-llava")
    inputs, s = tiny_prompt(cfg)
    bench = load_script("bench")
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        dec = StaticDecoder(model, cfg, 2, s + 5, "cpu")
        dec.prefill(inputs)
        dec.margins = []
        dec.run_steps(3)
        assert len(dec.margins) == 3 and all(m.shape == (2, 2) for m in dec.margins)
        for k, m in enumerate(dec.margins, start=1):   # decode step k makes token k (generate's logits[k])
            top2 = gen.logits[k].double().topk(2, dim=-1).values
            torch.testing.assert_close(m.double(), torch.stack([top2[:, 0], top2[:, 0] - top2[:, 1]], 1),
                                       rtol=1e-4, atol=1e-4)
        dec.margins = None
        dec.prefill(inputs)
        dec.compiled = torch.compile(dec.step, backend="eager", fullgraph=True)
        dec.run_steps(2)
        assert dec.margins is None
    assert bench.logit_steps(0.0625, 4.59375, torch.bfloat16) == 2.0   # bf16 spacing at 4.59: 2^-5
    assert bench.logit_steps(0.0, 3.0, torch.bfloat16) == 0.0
    note = bench.tie_note(dict(eager_gap=0.0625, eager_top=4.59375, gap_steps=2.0))
    assert "2 steps of the logits' dtype: a near-tie" in note
    assert "worth checking" in bench.tie_note(dict(eager_gap=3.0, eager_top=4.6, gap_steps=96.0))
    assert bench.tie_note({"rows": 1, "first_step": 0}) == ""
    # rows 0 and 2 of 3 split at token 2 (decode step 2), row 1 later: the widest gap of rows 0 and 2 there
    differ = torch.zeros(3, 5, dtype=torch.bool)
    differ[0, 2:] = differ[2, 2:] = differ[1, 4] = True
    margins = torch.tensor([[[5.0, 1.0]] * 3, [[4.59375, 0.03125], [9.0, 9.0], [4.59375, 0.0625]],
                            [[5.0, 1.0]] * 3, [[5.0, 1.0]] * 3])
    mm = bench.mismatch_info(differ, margins, torch.bfloat16)
    assert mm == dict(rows=3, first_step=2, eager_top=4.59375, eager_gap=0.0625, gap_steps=2.0)
    assert bench.mismatch_info(torch.zeros(2, 4, dtype=torch.bool), margins, torch.bfloat16) is None
    assert bench.mismatch_info(differ, None, torch.bfloat16) == dict(rows=3, first_step=2)


@pytest.mark.parametrize("chunk", [5, 7])
@pytest.mark.parametrize("arch", ["tiny-llava", "tiny-qwen2vl"])
def test_chunked_prefill_writes_the_same_cache(arch, chunk):
    """prefill(chunk=n): the language model sees at most n prompt tokens per pass, the cache and the
    first token match the one-pass prefill, decoding continues identically, and the model's own
    forward is restored afterwards."""
    from grace_ds.export.decode import StaticDecoder

    cfg, model = tiny_vlm(arch)
    inputs, s = tiny_prompt(cfg)
    lm = model.model.language_model
    seen = []
    hook = lm.layers[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    with torch.no_grad():
        full = StaticDecoder(model, cfg, 2, s + 6, "cpu")
        full.prefill(inputs)
        seen.clear()
        part = StaticDecoder(model, cfg, 2, s + 6, "cpu")
        part.prefill(inputs, chunk=chunk)
        assert seen == [min(chunk, s - a) for a in range(0, s, chunk)]
        assert "forward" not in vars(lm)
        for a, b in zip(full.cache.layers, part.cache.layers):
            torch.testing.assert_close(b.keys, a.keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(b.values, a.values, rtol=1e-5, atol=1e-5)
        assert torch.equal(part.out[:, 0], full.out[:, 0])
        full.run_steps(5)
        part.run_steps(5)
    hook.remove()
    assert torch.equal(part.out[:, :6], full.out[:, :6])


@pytest.mark.parametrize("arch", ["tiny-llava", "tiny-qwen2vl"])
def test_decode_step_traces_as_one_graph(arch):
    """`launch/bench.py --mode compile` (inductor, then a CUDA graph of the result) fuses the decode step's
    small ops only if TorchDynamo sees the whole step: one graph, no break (a .item(), a Python
    branch on a tensor or an untraceable cache call would split it). The traced step, run with the
    eager backend, also makes the same tokens."""
    import torch._dynamo

    from grace_ds.export.decode import StaticDecoder

    cfg, model = tiny_vlm(arch)
    inputs, s = tiny_prompt(cfg)
    with torch.no_grad():
        dec = StaticDecoder(model, cfg, 2, s + 6, "cpu")
        dec.prefill(inputs)
        dec.run_steps(5)
        ref = dec.out[:, :6].clone()
        dec.prefill(inputs)
        torch._dynamo.reset()
        ex = torch._dynamo.explain(dec.step)()
        assert (ex.graph_count, ex.graph_break_count) == (1, 0), [str(b.reason) for b in ex.break_reasons]
        dec.prefill(inputs)   # explain ran the step once
        dec.compiled = torch.compile(dec.step, backend="eager", fullgraph=True)
        dec.run_steps(5)
    assert torch.equal(dec.out[:, :6], ref)


def test_bench_smoke_trained_checkpoint(llava4, tmp_path):
    """--checkpoint with a final export dir: bf16 from the latent weights, INT4 packed on the fly."""
    bench = load_script("bench")
    rc = bench.main(["--smoke", "--in-process", "--checkpoint", str(llava4["dir"]), "--batch", "1",
                     "--new-tokens", "2", "--json", str(tmp_path / "t.json")])
    res = json.loads((tmp_path / "t.json").read_text())["results"]
    assert rc == 0, res
    assert [r["variant"] for r in res] == ["bf16", "int4"] and res[1]["backends"] == {"kernels.w4a16": 14}


def test_bench_smoke_int4(tmp_path):
    bench = load_script("bench")
    rc = bench.main(["--smoke", "--in-process", "--arch", "tiny-qwen2vl", "--batch", "2", "--new-tokens", "3",
                     "--out", str(tmp_path / "t.md"), "--json", str(tmp_path / "t.json")])
    assert rc == 0
    res = json.loads((tmp_path / "t.json").read_text())["results"]
    assert [r["variant"] for r in res] == ["bf16", "int4"] and res[1]["backends"] == {"kernels.w4a16": 14}
    assert all(r["runs"][0]["visual_tokens"] == 16 and r["runs"][0]["graph_matches_eager"] for r in res)
    assert "decode speed-up vs bf16" in (tmp_path / "t.md").read_text()


def test_bench_cache_len_sizes_the_static_cache(tmp_path):
    """--cache-len: both variants decode over a static cache of that many positions (a server's), recorded in
    the table and the results; one the generation does not fit in is refused with the sizes."""
    bench = load_script("bench")
    rc = bench.main(["--smoke", "--in-process", "--arch", "tiny-llava", "--batch", "1", "--new-tokens", "3",
                     "--cache-len", "96", "--out", str(tmp_path / "t.md"), "--json", str(tmp_path / "t.json")])
    assert rc == 0
    res = json.loads((tmp_path / "t.json").read_text())["results"]
    assert [r["runs"][0]["cache_len"] for r in res] == [96, 96] and res[0]["runs"][0]["prompt_len"] + 3 < 96
    assert "static KV cache of 96 positions (--cache-len)" in (tmp_path / "t.md").read_text()
    args = bench.parse_args(["--smoke", "--arch", "tiny-llava", "--new-tokens", "8", "--cache-len", "20"])
    with pytest.raises(ValueError, match=r"--cache-len 20: the prompt \(18 tokens\) and --new-tokens 8 need 26"):
        bench.cache_length(args, 18)
    assert bench.cache_length(bench.parse_args(["--smoke", "--new-tokens", "8"]), 18) == 26
    assert "--cache-len" in bench._forwarded(args) and "20" in bench._forwarded(args)


@pytest.mark.parametrize("arch", ["tiny-llava", "tiny-qwen2vl"])
def test_quantize_lm_head_is_rtn_and_matches_a_float64_reference(arch):
    """--int4-lm-head: the head becomes codes * scales with codes = round(W / s) clamped to the INT4
    grid (checked element by element in float64), and its output is x @ (codes * s)^T."""
    from grace_ds.export.load import quantize_lm_head_

    cfg, model = tiny_vlm(arch)
    w = model.get_output_embeddings().weight.detach().double().clone()
    embed = model.get_input_embeddings().weight.detach().clone()
    head = quantize_lm_head_(model)
    assert model.get_output_embeddings() is head and head.out_features == w.shape[0]
    if isinstance(head, W4A16Linear) and head._keys:   # packed for the kernel: unpack with its own reference
        from kernels.w4a16.pack import unpack_weights

        codes, scales = unpack_weights(head.packed())
    elif isinstance(head, W4A16Linear):
        codes, scales = head.k_codes, head.k_scales
    else:
        codes, scales = head.codes, head.scales
    codes, scales = codes.double(), scales.double()
    s = scales.repeat_interleave(128, dim=1)
    x = w / s
    # round to nearest on the INT4 grid; the kernel keeps scales in bf16, hence 0.52 rather than 0.5
    inner = (codes > -8) & (codes < 7)
    assert codes.min() >= -8 and codes.max() <= 7 and inner.float().mean() > 0.9
    assert (x - codes)[inner].abs().max() <= 0.52
    assert (x[codes == 7] >= 6.48).all() and (x[codes == -8] <= -7.48).all()
    w_hat = codes * s
    assert (w_hat - w).norm() / w.norm() < 0.15      # 4-bit rounding of Gaussian weights: ~0.1
    h = torch.randn(3, w.shape[1], dtype=torch.float64)
    ref = h @ w_hat.t()
    with torch.no_grad():
        y = head(h.float()).double()
    assert ((y - ref).norm() / ref.norm()).item() < 1e-3
    assert torch.equal(model.get_input_embeddings().weight, embed)   # embeddings untouched
    with pytest.raises(ValueError, match="already quantised"):
        quantize_lm_head_(model)


def test_bench_smoke_int4_lm_head(tmp_path):
    bench = load_script("bench")
    rc = bench.main(["--smoke", "--in-process", "--arch", "tiny-llava", "--batch", "1", "--new-tokens", "3",
                     "--int4-lm-head", "--out", str(tmp_path / "t.md"), "--json", str(tmp_path / "t.json")])
    assert rc == 0
    res = json.loads((tmp_path / "t.json").read_text())["results"]
    assert res[0]["backends"] == {} and "lm_head" not in res[0]          # bf16 variant untouched
    assert sum(res[1]["backends"].values()) == 15 and res[1]["lm_head"] == "int4 (RTN)"
    assert "--int4-lm-head" in (tmp_path / "t.md").read_text()


@pytest.mark.parametrize("arch", ["tiny-llava", "tiny-qwen2vl"])
def test_int8_embeddings_match_a_float64_reference_and_decode(arch):
    """--int8-embed: codes = round(W / s) with s = row absmax / 127 (float64 check), a lookup returns
    the bf16 rounding of codes * s, the table takes 1 byte per value, the decode step still traces as
    one graph and greedy decoding follows the 16-bit model."""
    import torch._dynamo

    from grace_ds.export.decode import StaticDecoder
    from grace_ds.export.load import Int8Embedding, quantize_embeddings_

    cfg, model = tiny_vlm(arch)
    model = model.to(torch.bfloat16)
    w = model.get_input_embeddings().weight.detach().double().clone()
    inputs, s = tiny_prompt(cfg)
    inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in inputs.items()}
    with torch.no_grad():
        ref = StaticDecoder(model, cfg, 2, s + 8, "cpu")
        ref.prefill(inputs)
        ref.run_steps(6)
        emb = quantize_embeddings_(model)
    assert model.get_input_embeddings() is emb and isinstance(emb, Int8Embedding)
    assert emb.codes.dtype == torch.int8 and emb.codes.shape == w.shape and emb.scale.shape == (w.shape[0], 1)
    scale = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127      # an all-zero row (padding) keeps a tiny scale
    torch.testing.assert_close(emb.scale.double(), scale, rtol=1e-6, atol=0)
    assert ((w / emb.scale.double() - emb.codes.double()).abs() <= 0.5 + 1e-4).all()
    ids = torch.randint(0, w.shape[0], (3, 5))
    with torch.no_grad():
        got = emb(ids)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, (emb.codes[ids].float() * emb.scale[ids]).to(torch.bfloat16))
    assert ((got.double() - w[ids]).abs() <= scale[ids] / 2 * 1.01 + w[ids].abs() / 128).all()
    with torch.no_grad():
        dec = StaticDecoder(model, cfg, 2, s + 8, "cpu")
        dec.prefill(inputs)
        torch._dynamo.reset()
        ex = torch._dynamo.explain(dec.step)()
        assert (ex.graph_count, ex.graph_break_count) == (1, 0), [str(b.reason) for b in ex.break_reasons]
        dec.prefill(inputs)
        dec.run_steps(6)
    assert (dec.out[:, :7] == ref.out[:, :7]).float().mean() >= 0.9
    with pytest.raises(ValueError, match="already int8"):
        quantize_embeddings_(model)


def test_int8_embeddings_refuse_a_tied_table():
    from grace_ds.export.load import quantize_embeddings_

    cfg, model = tiny_vlm("tiny-llava")
    model.lm_head.weight = model.get_input_embeddings().weight
    with pytest.raises(ValueError, match="tied to lm_head"):
        quantize_embeddings_(model)


def test_bench_smoke_int8_embed(tmp_path):
    bench = load_script("bench")
    rc = bench.main(["--smoke", "--in-process", "--arch", "tiny-qwen2vl", "--batch", "1", "--new-tokens", "3",
                     "--int4-lm-head", "--int8-embed", "--int8-vision", "--out", str(tmp_path / "t.md"),
                     "--json", str(tmp_path / "t.json")])
    assert rc == 0
    res = json.loads((tmp_path / "t.json").read_text())["results"]
    assert "embed_tokens" not in res[0] and res[1]["embed_tokens"] == "int8"
    assert "vision" not in res[0] and res[1]["vision"] == "int8 (10 linears)"   # 2 blocks x (qkv, proj, fc1, fc2) + merger 2
    text = (tmp_path / "t.md").read_text()
    assert "--int8-embed" in text and "--int8-vision" in text


def test_bench_profile_steps_breaks_the_step_down(tmp_path):
    """--profile-steps: the decode step's time by kernel kind and its top kernels, per run, in the JSON
    and the table (on the CPU: aten self times); the kinds' sum is the total, and the names classify."""
    bench = load_script("bench")
    rc = bench.main(["--smoke", "--in-process", "--arch", "tiny-llava", "--variants", "bf16", "--batch", "1",
                     "--new-tokens", "6", "--profile-steps", "3", "--json", str(tmp_path / "t.json"),
                     "--out", str(tmp_path / "t.md")])
    assert rc == 0
    run = json.loads((tmp_path / "t.json").read_text())["results"][0]["runs"][0]
    for key, calls in (("profile", 3), ("profile_prefill", 2)):   # --profile-steps 3 (of 5 steps; 1 warm)
        prof = run[key]
        assert prof["calls"] == calls and not prof["device"] and prof["total_us"] > 0
        assert abs(sum(prof["kinds"].values()) - prof["total_us"]) < 1e-6 * prof["total_us"] + 1e-9
        assert prof["top"] and all(t["calls"] > 0 and t["us"] > 0 for t in prof["top"])
    text = (tmp_path / "t.md").read_text()
    assert "Decode step of tiny-llava bf16 batch 1" in text and "Prefill of tiny-llava bf16 batch 1" in text
    kinds = {n: bench.kernel_kind(n) for n in ("w4a16_sk_kernel<bf16>", "_kv8_decode_kernel", "_kv16_decode_kernel",
                                               "_kv8_merge_kernel", "fmha_cutlassF_bf16", "sm90_xmma_gemm_bf16bf16",
                                               "triton_poi_fused_add_0", "void at::native::elementwise_kernel<copy>",
                                               "mystery")}
    assert len(set(kinds.values())) == len(kinds), kinds
    # fused kernels named after the ops they absorbed (names from an H200 profile) are inductor's, not the GEMM's
    # or SDPA's
    for name in ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_view_w4a16_gemm_12",
                 "triton_poi_fused__to_copy_add_arange_cat_cos_decode_attention_expand_le_mul_neg_scalar_ten"):
        assert bench.kernel_kind(name) == kinds["triton_poi_fused_add_0"], name


def test_bench_keeps_the_batches_a_timed_out_worker_finished(tmp_path):
    """A worker writes its JSON after every batch; when the parent stops it for time, the finished
    batches stay in the table and each unfinished one gets an error row (an H200 run lost a measured
    batch-1 row this way). Exercised through the real worker: it runs batch 1, then the file is
    treated as a timeout's leftover."""
    bench = load_script("bench")
    out = tmp_path / "w.json"
    args = bench.parse_args(["--smoke", "--worker", "--arch", "tiny-llava", "--variant", "bf16", "--batch", "1",
                             "--new-tokens", "3", "--json-out", str(out)])
    args.arch = "tiny-llava"
    bench.worker(args)
    done = json.loads(out.read_text())
    assert [r["batch"] for r in done["runs"]] == [1] and "unfinished" not in done    # a finished worker
    done["unfinished"] = [16]                                                      # as if stopped before batch 16
    out.write_text(json.dumps(done))
    args.batch = [1, 16]
    res = bench.after_timeout(out, "tiny-llava", "bf16", args)
    assert [r["batch"] for r in res["runs"]] == [1, 16] and "error" not in res["runs"][0]
    assert "timed out" in res["runs"][1]["error"] and not res.get("error") and "unfinished" not in res
    table = bench.render([res], args, "cmd")
    assert "| tiny-llava | bf16 | 1 |" in table and "timed out" in table
    out.unlink()                                                                   # stopped before any batch
    res = bench.after_timeout(out, "tiny-llava", "bf16", args)
    assert [r["batch"] for r in res["runs"]] == [1, 16] and "timed out" in res["error"]


@pytest.mark.parametrize("arch", ["tiny-llava", "tiny-qwen2vl"])
def test_int8_vision_matches_a_float64_reference_and_decode(arch):
    """--int8-vision: every linear of the vision encoder and projector (none of the language model's)
    becomes Int8Linear, whose output is F.linear with codes * scale (s = row absmax / 127, checked in
    float64); the image features stay within the rounding's bound of the 16-bit ones, and greedy
    decoding follows the 16-bit model."""
    from grace_ds.export.decode import StaticDecoder
    from grace_ds.export.load import VISION_PATTERNS, Int8Linear, quantize_vision_

    cfg, model = tiny_vlm(arch)
    model = model.to(torch.bfloat16)
    inputs, s = tiny_prompt(cfg)
    inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in inputs.items()}
    vision = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(re.search(p, n) for p in VISION_PATTERNS)]
    text = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in vision]
    weights = {n: model.get_submodule(n).weight.detach().double().clone() for n in vision}
    feats = image_features(model, inputs)
    with torch.no_grad():
        ref = StaticDecoder(model, cfg, 2, s + 8, "cpu")
        ref.prefill(inputs)
        ref.run_steps(6)
        assert quantize_vision_(model) == len(vision) > 0
    assert all(isinstance(model.get_submodule(n), Int8Linear) for n in vision)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in text)          # the language model untouched
    lin = model.get_submodule(vision[0])
    w = weights[vision[0]]
    scale = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    torch.testing.assert_close(lin.scale.double(), scale, rtol=1e-6, atol=0)
    assert ((w / lin.scale.double() - lin.codes.double()).abs() <= 0.5 + 1e-4).all()
    x = torch.randn(3, lin.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        got = lin(x)
    deq = (lin.codes.double() * lin.scale.double()).to(torch.bfloat16).double()    # the weight as F.linear sees it
    want = x.double() @ deq.T + (0 if lin.bias is None else lin.bias.double())
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-2
    q_feats = image_features(model, inputs)
    assert ((q_feats - feats).norm() / feats.norm()).item() < 3e-2, "int8 vision features drift"
    with torch.no_grad():
        dec = StaticDecoder(model, cfg, 2, s + 8, "cpu")
        dec.prefill(inputs)
        dec.run_steps(6)
    assert (dec.out[:, :7] == ref.out[:, :7]).float().mean() >= 0.9
    with pytest.raises(ValueError, match="already int8"):
        quantize_vision_(model)


def image_features(model, inputs) -> torch.Tensor:
    """The projected image features the language model receives (float64)."""
    with torch.no_grad():
        if "image_grid_thw" in inputs:
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        else:
            out = model.model.get_image_features(inputs["pixel_values"])
    out = getattr(out, "pooler_output", out)
    out = torch.cat(list(out)) if isinstance(out, (list, tuple)) else out
    return out.double()


# ----------------------------------------------------------------------------- GPU (skipped without CUDA)

@pytest.mark.gpu
def test_gpu_kernel_model_matches_dequant(llava4, tmp_path):
    out = tmp_path / "packed"
    convert_checkpoint(llava4["dir"], out, progress=False, log=lambda s: None)
    inputs = {k: (v.to("cuda", torch.bfloat16) if v.is_floating_point() else v.to("cuda"))
              for k, v in llava4["inputs"].items()}
    mk = load_packed_model(out, device="cuda", dtype=torch.bfloat16)
    md = load_packed_model(out, device="cuda", dtype=torch.bfloat16, force_dequant=True)
    with torch.no_grad():
        a, b = mk(**inputs).logits.float(), md(**inputs).logits.float()
    assert (a - b).abs().max() <= 3e-2 * b.abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_gpu_bench_batch_peak_memory_is_its_own(tmp_path, mode):
    """A batch measured after another in the same worker peaks where it peaks alone: the bench lets the first
    batch's decoder (graph, compiled step, cache) go first (bench.release). On an H200 LLaVA-1.5-7B INT4 at
    batch 16 read 0.5 GiB more after batch 1 than alone (2026-11-29 22:31, before release existed)."""
    bench = load_script("bench")
    peaks, starts = {}, {}
    for batches in (["1", "4"], ["4"]):   # each in its own worker process
        out = tmp_path / f"{'_'.join(batches)}.json"
        rc = bench.main(["--arch", "tiny-llava", "--variants", "int4", "--batch", *batches,
                         "--new-tokens", "8", "--visual-tokens", "16", "--text-tokens", "8", "--device", "cuda",
                         "--mode", mode, "--cache-len", "512", "--json", str(out)])
        res = json.loads(out.read_text())["results"]
        assert rc == 0, res
        peaks[len(batches)] = res[0]["runs"][-1]["peak_alloc_gib"] * 2**30
        starts[len(batches)] = res[0]["runs"][-1]["start_alloc_gib"] * 2**30
    # batch 1's 512-position cache alone is 2 x 2 layers x 1 kv head x 512 x 64 x 2 bytes = 256 KB; allow 64 KB.
    # starts: what was allocated when the peak was reset - batch 1's leftovers would show there.
    assert abs(starts[2] - starts[1]) <= 64 * 1024, (peaks, starts)
    # The peaks: equal in graph mode since one warm-up stream serves every capture (H200, 2026-11-30 00:25). In
    # compile mode batch 4 after batch 1 peaked 28.2 MiB higher than alone, twice (00:25, 00:38), with equal
    # starts: something the second compile allocates transiently, not a leftover; not found yet (~0.2% of a 7B
    # INT4 run's peak). Allowed up to 32 MiB there until it is.
    slack = 64 * 1024 if mode == "graph" else 32 * 2**20
    assert abs(peaks[2] - peaks[1]) <= slack, (peaks, starts)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_gpu_bench_graph_capture(tmp_path, mode):
    """The decode step (eager, or inductor-compiled) captures as a CUDA graph for bf16 and INT4 and
    replays the eager tokens."""
    bench = load_script("bench")
    rc = bench.main(["--in-process", "--arch", "tiny-llava", "tiny-qwen2vl", "--batch", "1", "4", "--new-tokens", "8",
                     "--visual-tokens", "16", "--text-tokens", "8", "--device", "cuda", "--mode", mode,
                     "--json", str(tmp_path / "t.json")])
    res = json.loads((tmp_path / "t.json").read_text())["results"]
    assert rc == 0, res
    for r in res:
        for run in r["runs"]:
            assert run["mode"] == mode, (r["arch"], r["variant"], run)
            # tokens in graph mode; a compiled step rounds differently (test_kv8: its logits)
            assert mode == "compile" or run["graph_matches_eager"], (r["arch"], r["variant"], run)
