"""Gradient quantization on a real torch.distributed process group: 2 processes on gloo over
loopback, spawned per test, bounded in time."""
import datetime
import multiprocessing as mp
import socket
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist

from kquant.distributed import QuantizedCommState, pack_codes, quantize_chunks, quantized_allreduce_hook, unpack_codes

TIMEOUT = 120


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, queue, args):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        try:
            queue.put((rank, "ok", fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException as e:  # reported to the parent
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def run_ranks(fn, world=2, *args):
    """fn(rank, world, *args) on ``world`` processes; {rank: ("ok", result) or ("error", text)}."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, queue, args)) for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=TIMEOUT)
            out[rank] = (status, value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return out


def _ok(out):
    for rank, (status, value) in sorted(out.items()):
        assert status == "ok", f"rank {rank}: {value}"
    return [out[r][1] for r in sorted(out)]


# ----------------------------------------------------------------------------- workers (run in the ranks)
def _statistics(rank, world, bits, steps):
    n = 3000  # not a multiple of world * chunk: padding on the wire
    g = torch.Generator().manual_seed(100 + rank)
    base = torch.randn(n, generator=g) * torch.linspace(0.1, 3, n)
    exact = base.clone()
    dist.all_reduce(exact)
    exact /= world
    res = {}
    for ef in (False, True):
        state = QuantizedCommState(bits=bits, error_feedback=ef, min_bucket_elements=0, seed=7)
        total = torch.zeros(n)
        errs = []
        for _ in range(steps):
            out = state.allreduce(base.clone(), 0)
            total += out
            errs.append(float((out - exact).norm() / exact.norm()))
        res[ef] = {"mean_err": float((total / steps - exact).norm() / exact.norm()),
                   "sum_err": float((total - steps * exact).norm() / exact.norm()),
                   "step_err": sum(errs) / len(errs), "bytes": state.bytes_sent, "fp32": state.fp32_bytes,
                   "expected": state.expected_bytes(n, world) * steps, "steps": state.steps}
    return res


def _mismatch(rank, world):
    state = QuantizedCommState(bits=8 if rank == 0 else 4, min_bucket_elements=0)
    try:
        state.allreduce(torch.randn(2048), 0)
    except ValueError as e:
        return str(e)
    return "no error"


def _ddp(rank, world, bits):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    state = QuantizedCommState(bits=bits, warmup_steps=2, min_bucket_elements=256)
    ddp.register_comm_hook(state, quantized_allreduce_hook)
    opt = torch.optim.Adam(ddp.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(256, 32, generator=g), torch.randint(0, 4, (256,), generator=g)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    every = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(every, flat)
    return {"losses": losses, "same": all(torch.equal(every[0], e) for e in every), "steps": state.steps,
            "exact": state.exact_buckets, "ratio": state.bytes_sent / state.fp32_bytes}


def _single(rank, world):
    state = QuantizedCommState(bits=2)
    t = torch.randn(5000)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = state.allreduce(t.clone(), 0)
    return {"equal": torch.equal(out, t), "warned": [str(x.message) for x in w], "bytes": state.bytes_sent}


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_unbiased_byte_count_and_error_feedback(bits):
    steps = 200
    for res in _ok(run_ranks(_statistics, 2, bits, steps)):
        plain, ef = res[False], res[True]
        # unbiased: the mean over many steps converges to the exact mean
        assert plain["mean_err"] < 0.25 * plain["step_err"], plain
        assert plain["step_err"] < {8: 0.02, 4: 0.3, 2: 1.5}[bits], plain
        # bytes: the formula, and bits/32 of a ring fp32 all-reduce (plus the scales)
        assert plain["bytes"] == plain["expected"] and plain["steps"] == steps
        assert plain["fp32"] == steps * 2 * 1 * 3000 * 4 // 2
        assert plain["bytes"] / plain["fp32"] <= {8: 0.3, 4: 0.16, 2: 0.1}[bits]
        # error feedback: the accumulated sum tracks the exact sum (bounded, not growing with steps)
        assert ef["sum_err"] < 3 * ef["step_err"], ef
        assert ef["sum_err"] < 0.5 * plain["sum_err"], (ef, plain)


def test_ddp_training_with_the_hook_keeps_ranks_in_sync():
    for res in _ok(run_ranks(_ddp, 2, 4)):
        assert res["same"], "ranks' parameters diverged"
        assert res["losses"][-1] < 0.8 * res["losses"][0]
        assert res["steps"] == 30 and res["exact"] >= 2  # the warm-up steps ran the exact all-reduce
        assert res["ratio"] < 0.5


def test_mismatched_bits_raise_on_every_rank_without_hanging():
    for msg in _ok(run_ranks(_mismatch, 2)):
        assert "ranks disagree" in msg and "bits=" in msg


def test_group_of_one_is_exact_and_says_so():
    (res,) = _ok(run_ranks(_single, 1))
    assert res["equal"] and res["bytes"] == 0
    assert any("one rank" in w for w in res["warned"])


def test_bad_input():
    for bits in (1, 3, 16, True):
        with pytest.raises(ValueError, match="bits must be one of"):
            QuantizedCommState(bits=bits)
    with pytest.raises(ValueError, match="chunk_size"):
        QuantizedCommState(chunk_size=4)
    with pytest.raises(TypeError, match="floating point"):
        QuantizedCommState().allreduce(torch.ones(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="QuantizedCommState"):
        quantized_allreduce_hook(None, None)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_packing_round_trips(bits):
    q = torch.randint(0, 1 << bits, (3, 64)).float()
    p = pack_codes(q, bits)
    assert p.dtype == torch.uint8 and p.shape == (3, 64 * bits // 8)
    assert torch.equal(unpack_codes(p, bits), q)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_cpu_kernel_matches_the_definition(bits):
    x = torch.randn(3, 5, 256) * torch.tensor([1e-4, 1.0, 10.0, 300.0, 0.0]).view(1, 5, 1)
    u = torch.rand(x.shape)
    codes, scales = torch.ops.kquant._grad_quantize_cpu(x.reshape(3, -1), u.reshape(3, -1), bits, 256)
    want_codes, want_scales = quantize_chunks(x, u, bits)
    assert torch.equal(scales, want_scales) and torch.equal(codes, want_codes)
    with pytest.raises(RuntimeError, match="bits must be 8, 4 or 2"):
        torch.ops.kquant._grad_quantize_cpu(x.reshape(3, -1), u.reshape(3, -1), 3, 256)
