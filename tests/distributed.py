"""run_distributed: N CPU ranks with a gloo process group, from inside a test.

Usage (in a test module; pytest puts tests/ on sys.path, so `from distributed import ...` works):

    from distributed import run_distributed

    def _body(rank, world_size, seed):          # module level (picklable by name for "spawn")
        import deepspeed
        engine, *_ = deepspeed.initialize(model=..., config=...)   # finds the group already set up
        return some_picklable_value              # tensors are fine (sent by value)

    def test_something():
        results = run_distributed(_body, world_size=2, args=(0,))  # [rank0 result, rank1 result]

What it does, per rank: sets MASTER_ADDR/MASTER_PORT (a free port), RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, one torch thread, initialises a gloo process group (so
`deepspeed.init_distributed()` and `deepspeed.initialize` just reuse it), runs
fn(rank, world_size, *args), destroys the group and sends the return value back pickled by value.
An exception on any rank is re-raised in the test as DistributedError with that rank's traceback;
the other ranks (likely stuck in a collective) are killed after a short grace period. A run past
`timeout` seconds kills every rank and raises TimeoutError naming the ranks that did not finish.

"fork" (default) reuses the modules the test process already imported: ~1 s per run instead of
~10 s for a fresh interpreter. Import torch/deepspeed/transformers in the test module, not only
inside fn, build one model of the class the ranks use in the parent (transformers imports model
code lazily), and call preload_deepspeed() at import time if the ranks call deepspeed.initialize. The first DeepSpeed initialisation on a machine JIT-builds
deepspeed_shm_comm (~35 s, then cached in ~/.cache/torch_extensions). Use "spawn" if the parent
holds state a fork must not inherit (then fn and args must be picklable by reference/value).
"""

from __future__ import annotations

import datetime
import gc
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import socket
import time
import traceback

__all__ = ["run_distributed", "DistributedError", "preload_deepspeed"]

# After one rank fails, how long the others get to report before they are killed: they are
# usually blocked in a collective that the failed rank will never join.
_GRACE_S = 5.0


class DistributedError(RuntimeError):
    pass


def preload_deepspeed() -> None:
    """Import, in the parent, what deepspeed.initialize would otherwise import in EVERY forked rank.

    - DeepSpeed 0.19's optimizer sanity check (zero/utils.py: is_zero_supported_optimizer) imports
      its Muon optimizer, whose module-level torch.compile pulls in torch._inductor: 10-30 s per
      rank on this 2-core machine;
    - init_distributed probes every op's compatibility (compiler runs: the "cannot find -laio"
      lines) and loads deepspeed_shm_comm (JIT-built on first use, ~35 s, then cached on disk);
      op builders keep loaded ops in a class-level cache that forked ranks inherit.
    Call it at import time of a test module whose ranks call deepspeed.initialize. Best effort:
    a failure here only means the ranks do the work themselves.
    """
    import deepspeed

    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    except ImportError:     # other DeepSpeed versions: nothing to preload
        pass
    try:
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            builder.load()
    except Exception:
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, timeout, results):
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
        "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1",
    })
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)     # the ranks share the machine's cores
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            value = fn(rank, world_size, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        # Plain pickle: torch's multiprocessing reducers would pass tensors through shared memory
        # that dies with this process.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_distributed(fn, world_size: int = 2, args: tuple = (), timeout: float = 120,
                    start_method: str = "fork") -> list:
    """Run fn(rank, world_size, *args) on `world_size` gloo ranks; returns the per-rank results."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, timeout, results))
             for r in range(world_size)]
    # Move the parent's objects (torch, transformers, the test session...) to gc's permanent
    # generation for the fork: DeepSpeed's ZeRO-3 setup calls gc.collect(), which otherwise walks
    # all of them in every rank (seconds each).
    if start_method == "fork":
        gc.freeze()
    try:
        for p in procs:
            p.start()
    finally:
        if start_method == "fork":
            gc.unfreeze()
    done: dict[int, tuple[bool, object]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(done) < world_size:
            now = time.monotonic()
            failed = any(not ok for ok, _ in done.values())
            if failed:
                deadline = min(deadline, now + _GRACE_S)
            if now >= deadline:
                break
            try:
                rank, ok, payload = results.get(timeout=min(0.5, deadline - now))
                done[rank] = (ok, payload)
                continue
            except queue_mod.Empty:
                pass
            # A rank that died without reporting (segfault, os._exit, OOM kill).
            for r, p in enumerate(procs):
                if r not in done and not p.is_alive() and p.exitcode not in (None, 0):
                    time.sleep(0.2)     # its report may still be in flight
                    if r not in done and results.empty():
                        done[r] = (False, f"rank {r} exited with code {p.exitcode} without reporting")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    errors = {r: payload for r, (ok, payload) in sorted(done.items()) if not ok}
    if errors:
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in errors.items())
        raise DistributedError(f"{len(errors)} of {world_size} ranks failed:\n{text}")
    missing = [r for r in range(world_size) if r not in done]
    if missing:
        raise TimeoutError(f"ranks {missing} did not finish within {timeout} s (killed)")
    return [pickle.loads(done[r][1]) for r in range(world_size)]
