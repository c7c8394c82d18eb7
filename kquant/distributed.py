"""Gradient quantization for data-parallel training: a communication hook for
``torch.nn.parallel.DistributedDataParallel``.

    state = kquant.distributed.QuantizedCommState(bits=4)
    ddp_model.register_comm_hook(state, kquant.distributed.quantized_allreduce_hook)

For each gradient bucket (``n`` values on each of ``W`` ranks) the hook runs a quantized
reduce-scatter and a quantized all-gather, never an all-gather of every rank's whole gradient:

1. with error feedback, the residual this rank kept from the bucket's last step is added;
2. the bucket is cut into ``W`` shards, each quantized in chunks of ``chunk_size`` values
   (``2^bits`` levels evenly spanning ``[-max|x|, max|x|]`` of the chunk, stochastic rounding,
   so the dequantized values are unbiased) and packed (one byte, or two 4-bit or four 2-bit
   codes per byte);
3. ``all_to_all``: shard ``j`` of every rank goes to rank ``j``, which dequantizes the ``W``
   copies of its shard and averages them in float;
4. each rank quantizes its averaged shard again and ``all_gather`` gives every rank all of them:
   the averaged gradient.

Bytes a rank sends per bucket: ``2 (W - 1) / W * n * bits / 8`` plus 4 bytes of scale per chunk
and shard, against ``2 (W - 1) / W * n * 4`` for a ring fp32 all-reduce: ``bits / 32`` of it (plus
the scales) at any world size.
"""

import warnings
from typing import Dict, Optional

import torch
import torch.distributed as dist

from .format import pack_codes, unpack_codes as _unpack_codes

__all__ = ["QuantizedCommState", "quantized_allreduce_hook", "BITS", "pack_codes", "unpack_codes", "quantize_chunks"]

BITS = (8, 4, 2)


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"QuantizedCommState: {name} must be an int >= {low}, got {value!r}")
    return value


def unpack_codes(p: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`pack_codes` (the weight format's bit order), as float32 ``[R, m]``."""
    return _unpack_codes(p, bits).float()


def quantize_chunks(x: torch.Tensor, u: torch.Tensor, bits: int):
    """The definition every kernel matches: chunks ``x [R, C, chunk]`` with uniforms ``u`` ->
    (packed codes ``[R, C * chunk * bits / 8]``, scales ``[R, C]``). The ``2^bits`` levels
    ``(code - half) * scale`` span ``[-max|x|, max|x|]`` (every code used, 2-bit included);
    stochastic rounding makes the dequantized value unbiased."""
    half = ((1 << bits) - 1) / 2
    amax = x.abs().amax(dim=-1)
    scales = torch.where(amax > 0, amax / half, torch.ones_like(amax))
    codes = torch.floor(x / scales.unsqueeze(-1) + half + u).clamp_(0, 2 * half)
    return pack_codes(codes.reshape(x.shape[0], -1), bits), scales


class QuantizedCommState:
    """State of :func:`quantized_allreduce_hook` for one DDP model.

    bits: 8, 4 or 2 per gradient value on the wire. chunk_size: values per scale.
    error_feedback: carry each step's quantization error (per bucket, on the gradient's device)
    into the next step. warmup_steps: the first steps run the exact fp32 all-reduce.
    min_bucket_elements: smaller buckets (where scales and latency outweigh the saving) run the
    exact all-reduce. seed: stochastic rounding (each rank adds its rank).

    ``bytes_sent`` counts what this rank sent for gradients since the state was made and
    ``fp32_bytes`` what a ring fp32 all-reduce of the same buckets would have sent; ``steps``
    counts hook calls on bucket 0. Every collective is bounded by the process group's timeout
    (``init_process_group(timeout=...)``).
    """

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None, bits: int = 8, chunk_size: int = 256,
                 error_feedback: bool = True, warmup_steps: int = 0, min_bucket_elements: int = 1024,
                 seed: int = 0):
        if isinstance(bits, bool) or bits not in BITS:
            raise ValueError(f"QuantizedCommState: bits must be one of {list(BITS)}, got {bits!r}")
        self.bits = bits
        self.chunk_size = _check_int(chunk_size, "chunk_size", 8)
        if self.chunk_size % (8 // bits) != 0:
            raise ValueError(f"QuantizedCommState: chunk_size must be a multiple of {8 // bits}, got {chunk_size}")
        self.warmup_steps = _check_int(warmup_steps, "warmup_steps", 0)
        self.min_bucket_elements = _check_int(min_bucket_elements, "min_bucket_elements", 0)
        self.error_feedback = bool(error_feedback)
        self.process_group = process_group
        self.seed = seed
        self.half = ((1 << bits) - 1) / 2  # codes 0 .. 2^bits - 1 stand for (code - half) * scale
        self.bytes_sent = 0
        self.fp32_bytes = 0
        self.steps = 0
        self.exact_buckets = 0  # buckets that ran the fp32 all-reduce (warm-up, small)
        self._residual: Dict[int, torch.Tensor] = {}
        self._shard_residual: Dict[int, torch.Tensor] = {}
        self._checked = False
        self._gens: Dict[torch.device, torch.Generator] = {}

    # ------------------------------------------------------------------ plumbing
    @property
    def group(self):
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def world_size(self) -> int:
        if not dist.is_initialized():
            raise RuntimeError("kquant.distributed: torch.distributed is not initialized; call "
                               "torch.distributed.init_process_group first")
        return dist.get_world_size(self.group)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._gens:
            self._gens[device] = torch.Generator(device=device).manual_seed(self.seed + dist.get_rank(self.group))
        return self._gens[device]

    def _check_ranks(self, world: int, device: torch.device) -> None:
        """Every rank must quantize alike: compare settings once (a clear error on every rank
        instead of collectives of different sizes that would hang)."""
        mine = torch.tensor([self.bits, self.chunk_size, int(self.error_feedback), self.warmup_steps,
                             self.min_bucket_elements], dtype=torch.int64, device=device)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine, group=self.group)
        names = ("bits", "chunk_size", "error_feedback", "warmup_steps", "min_bucket_elements")
        for r, theirs in enumerate(every):
            if not torch.equal(theirs, mine):
                diff = [f"{n}={int(a)} here, {int(b)} on rank {r}" for n, a, b in zip(names, mine, theirs) if a != b]
                raise ValueError(f"kquant.distributed: ranks disagree on the quantization settings ({'; '.join(diff)})"
                                 f"; every rank must build QuantizedCommState with the same arguments")
        self._checked = True

    # ------------------------------------------------------------------ quantization
    def _quantize(self, x: torch.Tensor, u: Optional[torch.Tensor] = None):
        """Chunks ``x [R, C, chunk]`` -> (packed codes ``[R, C * chunk * bits / 8]``, scales
        ``[R, C]``), on kquant's kernels: Triton on a GPU, C++ on a CPU (:func:`quantize_chunks`
        where neither is there)."""
        if u is None:
            u = torch.rand(x.shape, generator=self._generator(x.device), device=x.device)
        rows = x.shape[0]
        x2, u2 = x.reshape(rows, -1), u.reshape(rows, -1)
        if x.is_cuda and _triton_ready(self.chunk_size):
            from .backends import triton as kt
            return kt.grad_quantize(x2, u2, self.bits, self.chunk_size)
        if not x.is_cuda and _cpu_kernel():
            return torch.ops.kquant._grad_quantize_cpu(x2, u2, self.bits, self.chunk_size)
        return quantize_chunks(x, u, self.bits)

    def _unpack(self, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Packed codes ``[R, m]`` and scales ``[R, C]`` -> values ``[R, C, chunk]``."""
        return self._dequantize(unpack_codes(packed, self.bits).view(*scales.shape, self.chunk_size), scales)

    def _dequantize(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return (codes - self.half) * scales.unsqueeze(-1)

    # ------------------------------------------------------------------ the all-reduce
    def allreduce(self, tensor: torch.Tensor, bucket_index: int = 0) -> torch.Tensor:
        """Average ``tensor`` over the ranks in place (quantized as described in the module
        docstring) and return it. ``bucket_index`` keys the error-feedback residuals."""
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise TypeError(f"kquant.distributed: gradients must be floating point, got "
                            f"{getattr(tensor, 'dtype', type(tensor).__name__)}")
        world = self.world_size()
        if bucket_index == 0:
            self.steps += 1
        n = tensor.numel()
        full = 2 * (world - 1) * n * 4 // world
        self.fp32_bytes += full
        if world == 1:
            if self.steps == 1 and bucket_index == 0:
                warnings.warn("kquant.distributed: the process group has one rank; gradients are used as they are "
                              "(exact, nothing is sent)", stacklevel=3)
            return tensor
        if not self._checked:
            self._check_ranks(world, tensor.device)
        if self.steps <= self.warmup_steps or n < self.min_bucket_elements:
            dist.all_reduce(tensor, group=self.group)
            tensor /= world
            self.bytes_sent += full
            self.exact_buckets += 1
            return tensor
        c = self.chunk_size
        shard = -(-n // (world * c)) * c
        x = torch.nn.functional.pad(tensor.detach().reshape(-1).float(), (0, shard * world - n))
        if self.error_feedback and bucket_index in self._residual:
            x += self._residual[bucket_index]
        sent, s = self._quantize(x.view(world, shard // c, c))
        if self.error_feedback:
            self._residual[bucket_index] = x - self._unpack(sent, s).reshape(-1)
        # quantized reduce-scatter: shard j of every rank goes to rank j
        got, got_s = torch.empty_like(sent), torch.empty_like(s)
        dist.all_to_all_single(got, sent, group=self.group)
        dist.all_to_all_single(got_s, s.contiguous(), group=self.group)
        mine = self._unpack(got, got_s).sum(0) / world                       # [C, chunk]
        if self.error_feedback and bucket_index in self._shard_residual:
            mine += self._shard_residual[bucket_index]
        p2, s2 = self._quantize(mine.unsqueeze(0))
        if self.error_feedback:
            self._shard_residual[bucket_index] = mine - self._unpack(p2, s2)[0]
        # quantized all-gather of the averaged shards
        parts, parts_s = [torch.empty_like(p2) for _ in range(world)], [torch.empty_like(s2) for _ in range(world)]
        dist.all_gather(parts, p2, group=self.group)
        dist.all_gather(parts_s, s2, group=self.group)
        avg = torch.cat([self._unpack(p, ps).reshape(-1) for p, ps in zip(parts, parts_s)])
        self.bytes_sent += (world - 1) * (sent[0].numel() + s[0].numel() * 4 + p2.numel() + s2.numel() * 4)
        tensor.copy_(avg[:n].view_as(tensor))
        return tensor

    def expected_bytes(self, n: int, world: int) -> int:
        """Bytes one rank sends for a bucket of ``n`` values on the quantized path."""
        shard = -(-n // (world * self.chunk_size)) * self.chunk_size
        per_shard = shard * self.bits // 8 + (shard // self.chunk_size) * 4
        return 2 * (world - 1) * per_shard


def _cpu_kernel() -> bool:
    try:
        torch.ops.kquant._grad_quantize_cpu
        return True
    except (AttributeError, RuntimeError):  # the C++ extension was not built
        return False


def _triton_ready(chunk: int) -> bool:
    if chunk & (chunk - 1):
        return False  # the kernel's chunk is a power of two
    try:
        from .backends import triton as kt
        return kt._triton() is not None
    except ImportError:
        return False


def quantized_allreduce_hook(state: QuantizedCommState, bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: ``ddp_model.register_comm_hook(state, quantized_allreduce_hook)``."""
    if not isinstance(state, QuantizedCommState):
        raise TypeError(f"quantized_allreduce_hook needs a kquant.distributed.QuantizedCommState as its state, got "
                        f"{type(state).__name__}")
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(state.allreduce(bucket.buffer(), bucket.index()))
    return fut
