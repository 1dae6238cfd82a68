import sys, time, torch
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
        dec.prefill(inputs); dec.run_steps(7); ref = dec.out[:, :8].clone()
        dec.prefill(inputs)
        dec.compile()
        t0 = time.time(); dec.run_steps(7); print(arch, "compile+run", round(time.time() - t0, 1), "s")
        print(arch, "same tokens:", torch.equal(dec.out[:, :8], ref))
