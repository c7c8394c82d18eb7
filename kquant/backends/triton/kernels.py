"""Triton kernels of the kquant Triton backend (launchers live in ``__init__``).

This module is imported lazily and re-imported when ``TRITON_INTERPRET`` changes:
``@triton.jit`` decides between the compiler and the interpreter when it decorates.

Conventions shared by every GEMM kernel here:

* ``a``/``x`` is row-major ``[M, K]``; the weight is the canonical packed ``qweight``
  (kquant.format): int8 ``[N, K]`` or uint8 rows of 4-, 3- or 2-bit codes (``BITS``), so
  both dot operands are K-major, which is what int8 tensor-core MMAs (and wgmma) want.
  Sub-byte codes are unpacked in registers (:func:`_load_codes`); 3-bit rows hold a
  2-bit plane and a high-bit plane ``plane_off`` bytes further on.
* Rows/columns past M/N are clamped (``% M``) instead of masked on load, so the inner
  loop carries no M/N masks; only the stores are masked.
* Row offsets are widened to int64 before multiplying by a stride: M*K and N*K stay below
  2^31 at LLM sizes (4096 x 14336), but a long prompt times K would not.
* Split-K (``SPLIT_K > 1``) is deterministic: each K slice writes an fp32 partial to a
  workspace ``[SPLIT_K, M, N]`` and bumps a per-tile counter; the last slice to arrive
  sums the partials in slice order, adds bias, casts, stores and resets the counter to 0
  (so the counter buffer stays zeroed across calls and no memset launch is needed).
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _rint(y, INTERPRET: tl.constexpr):
    # round half to even, exactly like torch.round; libdevice has no interpreter mapping,
    # so the interpreter rounds with floor (exact for |y| < 2^23, and y is clamped first)
    if INTERPRET:
        fl = tl.math.floor(y)
        d = y - fl
        odd = (fl.to(tl.int32) & 1) == 1
        r = tl.where((d > 0.5) | ((d == 0.5) & odd), fl + 1.0, fl)
    else:
        r = libdevice.rint(y)
    return r


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped ordering: GROUP_M row-tiles share the weight tiles they stream through L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n, pid_m * num_pid_n + pid_n


@triton.jit
def _store_out(y, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        y = y + b[None, :]
    ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finish(y, out_ptr, bias_ptr, ws_ptr, cnt_ptr, tile_id, pid_k, offs_m, offs_n, M, N, stride_om,
            HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    if SPLIT_K == 1:
        _store_out(y, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS)
    else:
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        row = offs_m[:, None].to(tl.int64)
        tl.store(ws_ptr + (pid_k * M + row) * N + offs_n[None, :], y, mask=mask)
        # every thread's partial must be written before the (single-thread) release atomic
        tl.debug_barrier()
        count = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel")
        if count == SPLIT_K - 1:
            total = tl.zeros_like(y)
            for s in range(SPLIT_K):  # fixed order: results do not depend on arrival order
                part = tl.load(ws_ptr + (s * M + row) * N + offs_n[None, :], mask=mask, other=0.0,
                               cache_modifier=".cg")
                total += part
            tl.atomic_xchg(cnt_ptr + tile_id, 0)
            _store_out(total, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS)


# ----------------------------------------------------------------------------- packed weights
@triton.jit
def _fields(p, W: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Bytes ``p`` [ROWS, COLS * W / 8] -> their W-bit fields [ROWS, COLS], low bits first.

    Nested joins keep every field in the thread that loaded its byte (no data moves between
    threads); the reshape flattens the last joined axis fastest, hence the order of the shifts.
    """
    if W == 4:
        f = tl.join(p & 15, p >> 4)
    elif W == 2:
        f = tl.join(tl.join(p & 3, (p >> 4) & 3), tl.join((p >> 2) & 3, p >> 6))
    else:
        f = tl.join(tl.join(tl.join(p & 1, (p >> 4) & 1), tl.join((p >> 2) & 1, (p >> 6) & 1)),
                    tl.join(tl.join((p >> 1) & 1, (p >> 5) & 1), tl.join((p >> 3) & 1, p >> 7)))
    return tl.reshape(f, (ROWS, COLS))


@triton.jit
def _load_bytes(row_ptrs, k, k_hi, PER: tl.constexpr, NBYTES: tl.constexpr, EVEN: tl.constexpr):
    """The NBYTES bytes holding k .. k + NBYTES * PER (PER codes a byte) of the rows at
    ``row_ptrs`` [R, 1]; unless EVEN, bytes holding no k < k_hi read as 0."""
    offs = (k // PER + tl.arange(0, NBYTES))[None, :]
    if EVEN:
        p = tl.load(row_ptrs + offs)
    else:
        p = tl.load(row_ptrs + offs, mask=offs * PER < k_hi, other=0)
    return p


@triton.jit
def _load_codes(b_rows, k, k_hi, plane_off, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN: tl.constexpr):
    """Weight codes of k .. k + BLOCK_K for the rows at ``b_rows`` [BLOCK_N, 1]: int8 values
    (BITS = 8) or the unsigned uint8 codes of 4, 3 or 2 bits, zero point not removed."""
    if BITS == 8:
        q = _load_bytes(b_rows, k, k_hi, 1, BLOCK_K, EVEN)
    elif BITS == 3:
        lo = _fields(_load_bytes(b_rows, k, k_hi, 4, BLOCK_K // 4, EVEN), 2, BLOCK_N, BLOCK_K)
        hi = _fields(_load_bytes(b_rows + plane_off, k, k_hi, 8, BLOCK_K // 8, EVEN), 1, BLOCK_N, BLOCK_K)
        q = lo | (hi << 2)
    else:
        q = _fields(_load_bytes(b_rows, k, k_hi, 8 // BITS, BLOCK_K * BITS // 8, EVEN), BITS, BLOCK_N, BLOCK_K)
    return q


# ----------------------------------------------------------------------------- quantization
@triton.jit
def quantize_rows_kernel(x_ptr, q_ptr, s_ptr, act_scale_ptr, K, stride_x, stride_q,
                         STATIC: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
    """One row per program: a pass for amax (and NaN/Inf), then q = clamp(rint(x * inv), -127, 127).

    As the reference defines it: a row holding NaN or Inf gets q = 0 and scale NaN; a row with
    amax < 2^-64 is lifted by 2^64 (exact) before the reciprocal, which would overflow.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    offs = tl.arange(0, BLOCK_K)
    run = tl.zeros([BLOCK_K], dtype=tl.float32)
    bad = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k in range(0, K, BLOCK_K):
        ax = tl.abs(tl.load(x_row + k + offs, mask=k + offs < K, other=0.0).to(tl.float32))
        run = tl.maximum(run, ax)
        bad = bad | ((ax != ax) | (ax == float("inf"))).to(tl.int32)
    poisoned = tl.max(bad, axis=0) > 0
    lift = 1.0
    if STATIC:
        scale = tl.load(act_scale_ptr).to(tl.float32)
        inv = tl.math.div_rn(1.0, scale)  # the reference's 1.0 / s is reciprocal(s), IEEE-rounded
    else:
        amax = tl.max(run, axis=0)
        nz = amax > 0
        safe = tl.where(nz, amax, 1.0)
        lift = tl.where(nz & (amax < 5.421010862427522e-20), 18446744073709551616.0, 1.0)  # 2^-64, 2^64
        # the reference's `127.0 / amax` is torch's __rtruediv__: reciprocal(amax) * 127,
        # two IEEE roundings; copy them exactly so the int8 activations are bit-identical
        inv = tl.where(nz, tl.math.div_rn(1.0, safe * lift) * 127.0, 1.0)
        scale = tl.where(nz, tl.math.div_rn(safe, 127.0), 1.0)
    inv = tl.where(poisoned, 0.0, inv)
    for k in range(0, K, BLOCK_K):
        m = k + offs < K
        x = tl.load(x_row + k + offs, mask=m, other=0.0).to(tl.float32)
        x = tl.where(poisoned, 0.0, x * lift)
        # clamping before rounding changes nothing and keeps the interpreter's floor exact
        y = tl.minimum(tl.maximum(x * inv, -128.0), 128.0)
        q = tl.minimum(tl.maximum(_rint(y, INTERPRET), -127.0), 127.0)
        tl.store(q_row + k + offs, q.to(tl.int8), mask=m)
    tl.store(s_ptr + row, tl.where(poisoned, float("nan"), scale))


# ----------------------------------------------------------------------------- int8 x int8
@triton.jit
def int8_gemm_kernel(a_ptr, sx_ptr, b_ptr, sw_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                     M, N, K, K_PER_SPLIT, stride_am, stride_bn, stride_sw, stride_om, plane_off,
                     BITS: tl.constexpr, GROUP: tl.constexpr, SCALED: tl.constexpr,
                     HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, SPLIT_AB: tl.constexpr):
    """out = a @ dequant(b).T with exact int32 accumulation.

    SCALED=False: raw int32 output (int8_mm). SCALED=True: per group g,
    acc_f += float(int32 dot over g) * sw[n, g]; then y = acc_f * sx[m] (+ bias).
    GROUP == 0 means per channel; otherwise BLOCK_K == GROUP (one scale per K step).
    Sub-byte codes are symmetric: value = code - 2^(BITS-1).
    """
    pid_m, pid_n, tile_id = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_a = (offs_m % M).to(tl.int64)
    rows_b = (offs_n % N).to(tl.int64)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)

    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_a[:, None] * stride_am + (k_lo + offs_k)[None, :]
    b_rows = b_ptr + rows_b[:, None] * stride_bn
    SZ: tl.constexpr = 1 << (BITS - 1)  # the symmetric zero point of sub-byte codes

    acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc_f = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        if SPLIT_AB:
            # int4 without interleaving the weight tile: split the contiguous activation tile
            # into even/odd columns in registers (pairs sit in one thread) and meet the
            # low/high nibble planes in two dots
            km = (k + offs_k)[None, :] < k_hi
            a = tl.load(a_ptrs, mask=km, other=0)
            a_e, a_o = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))
            p = _load_bytes(b_rows, k, k_hi, 2, BLOCK_K // 2, EVEN_K)
            lo = (p & 15).to(tl.int8) - 8
            hi = (p >> 4).to(tl.int8) - 8
            part = tl.dot(a_e, tl.trans(lo), out_dtype=tl.int32)
            part = tl.dot(a_o, tl.trans(hi), part, out_dtype=tl.int32)
        else:
            if EVEN_K:
                a = tl.load(a_ptrs)
            else:
                a = tl.load(a_ptrs, mask=(k + offs_k)[None, :] < k_hi, other=0)
            w = _load_codes(b_rows, k, k_hi, plane_off, BITS, BLOCK_N, BLOCK_K, EVEN_K)
            if BITS != 8:
                w = w.to(tl.int8) - SZ
            if GROUP == 0:
                acc_i = tl.dot(a, tl.trans(w), acc_i, out_dtype=tl.int32)
            else:
                part = tl.dot(a, tl.trans(w), out_dtype=tl.int32)
        if SPLIT_AB and GROUP == 0:
            acc_i += part
        if GROUP != 0:
            sw = tl.load(sw_ptr + rows_b * stride_sw + k // GROUP)
            acc_f += part.to(tl.float32) * sw[None, :]
        a_ptrs += BLOCK_K

    if SCALED:
        if GROUP == 0:
            sw = tl.load(sw_ptr + rows_b * stride_sw)
            acc_f = acc_i.to(tl.float32) * sw[None, :]
        sx = tl.load(sx_ptr + (offs_m % M))
        y = acc_f * sx[:, None]
        _finish(y, out_ptr, bias_ptr, ws_ptr, cnt_ptr, tile_id, pid_k, offs_m, offs_n, M, N, stride_om,
                HAS_BIAS, SPLIT_K)
    else:
        ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(ptrs, acc_i, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# ----------------------------------------------------------------------------- weight only
@triton.jit
def wo_gemm_kernel(x_ptr, b_ptr, sw_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                   M, N, K, K_PER_SPLIT, stride_xm, stride_bn, stride_sw, stride_om, plane_off,
                   BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                   NEED_SUM: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, SPLIT_K: tl.constexpr,
                   EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, INTERPRET: tl.constexpr,
                   SPLIT_AB: tl.constexpr):
    """y = x @ ((codes - z) * s).T (+ bias), computed as s * (x @ codes.T - z * rowsum(x)).

    Codes (int8 values or unsigned sub-byte codes) are exact in fp16/bf16, so the dot runs on
    raw codes and scale/zero are applied once per group on the [M, N] tile instead of on
    every weight element. GROUP == 0: per channel (applied in the epilogue); otherwise
    BLOCK_K == GROUP. Symmetric sub-byte codes use z = 2^(BITS-1), symmetric int8 z = 0.
    """
    pid_m, pid_n, tile_id = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_x = (offs_m % M).to(tl.int64)
    rows_b = (offs_n % N).to(tl.int64)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)

    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows_x[:, None] * stride_xm + (k_lo + offs_k)[None, :]
    b_rows = b_ptr + rows_b[:, None] * stride_bn
    SZ: tl.constexpr = 1 << (BITS - 1)  # the symmetric zero point of sub-byte codes
    if GROUP == 0:
        if HAS_ZEROS:
            zc = tl.load(z_ptr + rows_b * stride_sw)
        elif BITS != 8:
            zc = tl.full([BLOCK_N], SZ, tl.float32)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    xsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        if SPLIT_AB:
            # int4 without interleaving the weight tile (see int8_gemm_kernel)
            x = tl.load(x_ptrs, mask=(k + offs_k)[None, :] < k_hi, other=0.0)
            x_e, x_o = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
            p = _load_bytes(b_rows, k, k_hi, 2, BLOCK_K // 2, EVEN_K)
            if INTERPRET:
                part = tl.dot(x_e.to(tl.float32), tl.trans((p & 15).to(tl.float32)), input_precision="ieee")
                part += tl.dot(x_o.to(tl.float32), tl.trans((p >> 4).to(tl.float32)), input_precision="ieee")
            elif IEEE:
                part = tl.dot(x_e, tl.trans((p & 15).to(tl.float32)), input_precision="ieee")
                part += tl.dot(x_o, tl.trans((p >> 4).to(tl.float32)), input_precision="ieee")
            else:
                part = tl.dot(x_e, tl.trans((p & 15).to(x.dtype)))
                part = tl.dot(x_o, tl.trans((p >> 4).to(x.dtype)), part)
            if NEED_SUM:
                xs = tl.sum(x.to(tl.float32), axis=1)
        else:
            if EVEN_K:
                x = tl.load(x_ptrs)
            else:
                x = tl.load(x_ptrs, mask=(k + offs_k)[None, :] < k_hi, other=0.0)
            q = _load_codes(b_rows, k, k_hi, plane_off, BITS, BLOCK_N, BLOCK_K, EVEN_K)
            if INTERPRET:
                # the interpreter casts int->bf16 and multiplies bf16 as raw bits; fp32 gives the
                # same products (code x bf16 is exact in fp32) and the same fp32 accumulation
                part = tl.dot(x.to(tl.float32), tl.trans(q.to(tl.float32)), input_precision="ieee")
            elif IEEE:
                part = tl.dot(x, tl.trans(q.to(tl.float32)), input_precision="ieee")
            else:
                part = tl.dot(x, tl.trans(q.to(x.dtype)))
            if NEED_SUM:
                xs = tl.sum(x.to(tl.float32), axis=1)
        if GROUP == 0:
            acc += part
            if NEED_SUM:
                xsum += xs
        else:
            s = tl.load(sw_ptr + rows_b * stride_sw + k // GROUP)
            if NEED_SUM:
                if HAS_ZEROS:
                    z = tl.load(z_ptr + rows_b * stride_sw + k // GROUP)
                else:
                    z = tl.full([BLOCK_N], SZ, tl.float32)
                part = part - xs[:, None] * z[None, :]
            acc += part * s[None, :]
        x_ptrs += BLOCK_K

    if GROUP == 0:
        sc = tl.load(sw_ptr + rows_b * stride_sw)
        if NEED_SUM:
            acc = acc - xsum[:, None] * zc[None, :]
        acc = acc * sc[None, :]
    _finish(acc, out_ptr, bias_ptr, ws_ptr, cnt_ptr, tile_id, pid_k, offs_m, offs_n, M, N, stride_om,
            HAS_BIAS, SPLIT_K)


@triton.jit
def _codes_f32(c, BIAS: tl.constexpr, FAST: tl.constexpr):
    """Non-negative integer codes c (< 2^23, as int32) minus BIAS, as exact fp32.

    int->float conversion (I2F) issues at a quarter of the FP32 rate on recent GPUs and
    bounded the GEMV; OR-ing the code into the mantissa of 2^23 and subtracting 2^23 + BIAS
    costs one integer and one float op at full rate, with the same exact result.
    """
    if FAST:
        f = (c | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + BIAS)
    else:
        f = c.to(tl.float32) - BIAS
    return f


@triton.jit
def wo_gemv_kernel(x_ptr, b_ptr, sw_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                   M, N, K, K_PER_SPLIT, stride_xm, stride_bn, stride_sw, stride_om, plane_off,
                   BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                   NEED_SUM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                   EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GPB: tl.constexpr, GS: tl.constexpr, SPLIT_X: tl.constexpr, FAST_CVT: tl.constexpr):
    """Weight-only GEMV for tiny M: one x row per program, CUDA-core FMAs, no tensor cores.

    At M = 1 a dot would waste 15/16 of the MMA and push every dequantized weight tile
    through shared memory; here each thread multiplies the codes it loaded by x in
    registers. Rows of one weight tile are adjacent in the grid, so for M > 1 the
    repeated weight reads hit L2. Same math as wo_gemm_kernel: s * (x.codes - z * sum(x)),
    with BLOCK_K = GPB groups of GS (GROUP == 0: per channel, GPB = 1, GS = BLOCK_K).
    SPLIT_X (4 bits only) keeps the nibble planes apart and splits x into even/odd columns.
    (An element-wise [BLOCK_N, BLOCK_K] accumulator with per-element scales measured
    slower on an H100 than these per-step row sums.)
    """
    pid = tl.program_id(0)
    row = pid % M
    pid_n = pid // M
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_b = (offs_n % N).to(tl.int64)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    x_row = x_ptr + row.to(tl.int64) * stride_xm

    offs_k = tl.arange(0, BLOCK_K)
    b_rows = b_ptr + rows_b[:, None] * stride_bn
    offs_g = tl.arange(0, GPB)
    SZ: tl.constexpr = 1 << (BITS - 1)  # the symmetric zero point of sub-byte codes

    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    xsum = tl.zeros([1], dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_row + k + offs_k).to(tl.float32)
        else:
            x = tl.load(x_row + k + offs_k, mask=k + offs_k < k_hi, other=0.0).to(tl.float32)
        if SPLIT_X:
            # keep the weight planes apart and split the (small) x vector instead
            p = _load_bytes(b_rows, k, k_hi, 2, BLOCK_K // 2, EVEN_K)
            x_e, x_o = tl.split(tl.reshape(x, (BLOCK_K // 2, 2)))
            if FAST_CVT:
                pi = p.to(tl.int32)
                prod = _codes_f32(pi & 15, 0.0, True) * x_e[None, :] + \
                    _codes_f32((pi >> 4) & 15, 0.0, True) * x_o[None, :]
            else:
                prod = (p & 15).to(tl.float32) * x_e[None, :] + (p >> 4).to(tl.float32) * x_o[None, :]
        else:
            q = _load_codes(b_rows, k, k_hi, plane_off, BITS, BLOCK_N, BLOCK_K, EVEN_K)
            if not FAST_CVT:
                qf = q.to(tl.float32)
            elif BITS == 8:
                qf = _codes_f32(q.to(tl.int32) + 128, 128.0, True)
            else:
                qf = _codes_f32(q.to(tl.int32), 0.0, True)
            prod = qf * x[None, :]
        if GROUP == 0:
            acc += tl.sum(prod, axis=1)
            if NEED_SUM:
                xsum += tl.sum(x, axis=0)
        elif GPB == 1:
            # one group per K step: plain row sums, one scale per row
            part = tl.sum(prod, axis=1)
            g_off = rows_b * stride_sw + k // GROUP
            s = tl.load(sw_ptr + g_off)
            if NEED_SUM:
                xs = tl.sum(x, axis=0)
                if HAS_ZEROS:
                    part = part - tl.load(z_ptr + g_off) * xs
                else:
                    part = part - SZ * xs
            acc += part * s
        else:
            if SPLIT_X:
                part = tl.sum(tl.reshape(prod, (BLOCK_N, GPB, GS // 2)), axis=2)  # [BN, GPB]
            else:
                part = tl.sum(tl.reshape(prod, (BLOCK_N, GPB, GS)), axis=2)
            g_ptrs = rows_b[:, None] * stride_sw + (k // GROUP + offs_g)[None, :]
            g_mask = (k // GROUP + offs_g)[None, :] < k_hi // GROUP  # K tail inside a step
            s = tl.load(sw_ptr + g_ptrs, mask=g_mask, other=0.0)
            if NEED_SUM:
                xs = tl.sum(tl.reshape(x, (GPB, GS)), axis=1)                      # [GPB]
                if HAS_ZEROS:
                    z = tl.load(z_ptr + g_ptrs, mask=g_mask, other=0.0)
                    part = part - z * xs[None, :]
                else:
                    part = part - SZ * xs[None, :]
            acc += tl.sum(part * s, axis=1)

    if GROUP == 0:
        if NEED_SUM:
            if HAS_ZEROS:
                zc = tl.load(z_ptr + rows_b * stride_sw)
            else:
                zc = tl.full([BLOCK_N], SZ, tl.float32)
            acc = acc - zc * xsum
        acc = acc * tl.load(sw_ptr + rows_b * stride_sw)
    offs_m = row + tl.zeros([1], dtype=tl.int32)
    _finish(tl.reshape(acc, (1, BLOCK_N)), out_ptr, bias_ptr, ws_ptr, cnt_ptr, pid, pid_k, offs_m, offs_n,
            M, N, stride_om, HAS_BIAS, SPLIT_K)


# ----------------------------------------------------------------------------- unpack / dequantize
@triton.jit
def dequant_kernel(b_ptr, sw_ptr, z_ptr, out_ptr, N, K, stride_bn, stride_sw, plane_off,
                   BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                   TO_INT8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weight [N, K] for large-M GEMMs: symmetric sub-byte codes -> int8 values (TO_INT8, for
    the int8 GEMM) or codes -> (code - z) * s in out's float dtype (for a cuBLAS matmul).

    At large M the GEMM is compute-bound and unpacking codes inside its inner loop cost ~3x;
    one pass over the weight (read N*K*BITS/8, write N*K bytes or elements) is cheaper.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_n % N).to(tl.int64)  # clamped like the GEMMs' rows; the stores are masked
    nmask = offs_n < N
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    q = _load_codes(b_ptr + rows[:, None] * stride_bn, pid_k * BLOCK_K, K, plane_off, BITS, BLOCK_N, BLOCK_K,
                    False).to(tl.int32)
    SZ: tl.constexpr = 1 << (BITS - 1)  # the symmetric zero point of sub-byte codes
    mask = nmask[:, None] & kmask[None, :]
    o_ptrs = out_ptr + rows[:, None] * K + offs_k[None, :]
    if TO_INT8:
        tl.store(o_ptrs, (q - SZ).to(tl.int8), mask=mask)
    else:
        if GROUP == 0:
            s = tl.load(sw_ptr + rows * stride_sw, mask=nmask, other=1.0)[:, None]
            if HAS_ZEROS:
                z = tl.load(z_ptr + rows * stride_sw, mask=nmask, other=0.0)[:, None]
        else:
            g_ptrs = rows[:, None] * stride_sw + (offs_k // GROUP)[None, :]
            s = tl.load(sw_ptr + g_ptrs, mask=mask, other=1.0)
            if HAS_ZEROS:
                z = tl.load(z_ptr + g_ptrs, mask=mask, other=0.0)
        if HAS_ZEROS:
            w = (q.to(tl.float32) - z) * s
        elif BITS != 8:
            w = (q - SZ).to(tl.float32) * s
        else:
            w = q.to(tl.float32) * s
        tl.store(o_ptrs, w.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- gradients
@triton.jit
def grad_quantize_kernel(x_ptr, u_ptr, codes_ptr, s_ptr, half, CHUNK: tl.constexpr, BITS: tl.constexpr):
    """One chunk of gradient values per program (kquant.distributed's rule): 2^BITS levels
    ``(code - half) * scale`` spanning [-max|x|, max|x|], stochastic rounding with the given
    uniforms ``u``, codes packed 8 // BITS per byte, low bits first."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + offs)
    u = tl.load(u_ptr + offs)
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, half), 1.0)
    c = tl.floor((tl.math.div_rn(x, scale) + half) + u)
    c = tl.minimum(tl.maximum(c, 0.0), 2.0 * half).to(tl.int32)
    PER: tl.constexpr = 8 // BITS
    shifts = tl.arange(0, PER) * BITS
    packed = tl.sum(tl.reshape(c, (CHUNK // PER, PER)) << shifts[None, :], axis=1)
    tl.store(codes_ptr + pid * (CHUNK // PER) + tl.arange(0, CHUNK // PER), packed.to(tl.uint8))
    tl.store(s_ptr + pid, scale)
