import sys, torch
sys.path.insert(0, "launch"); sys.path.insert(0, ".")
import bench
from grace_ds.export.arch import make_prompt, bench_config
from grace_ds.export.decode import StaticDecoder
for arch in ("tiny-llava", "tiny-qwen2vl"):
    config = bench_config(arch)
    model = bench.build_bf16(config, "cpu", torch.float32)
    with torch.no_grad():
        inputs = make_prompt(config, 2, 8, 16, device="cpu", dtype=torch.float32)
        L = inputs["input_ids"].shape[1]
        dec = StaticDecoder(model, config, 2, L + 8, "cpu")
        dec.prefill(inputs)
        ex = torch._dynamo.explain(dec.step)()
        print(arch, "graphs", ex.graph_count, "breaks", ex.graph_break_count)
        for b in ex.break_reasons[:5]:
            print("  ", str(b.reason)[:200])
