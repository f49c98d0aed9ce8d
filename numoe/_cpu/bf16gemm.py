"""bfloat16 matrix products for the CPU prefill: ``out = a @ w`` with float32 accumulation.

Three paths, the best the CPU has picked at run time (:func:`isa_path`):

* ``"amx_bf16"`` -- Intel AMX tiles (``tdpbf16ps``: a 16 x 32 bf16 tile
  times a 32 x 16 one into a 16 x 16 float32 tile), through LLVM's
  ``llvm.x86.tileloadd64`` / ``tdpbf16ps`` / ``tilestored64`` intrinsics. Linux
  hands AMX state to a process only on request: :func:`has_amx_bf16` asks
  once (``arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)``) and uses AMX only if
  granted. Blocks of 32 rows x 32 columns (4 accumulator tiles), whole K.
* ``"avx512_bf16"`` -- AVX512-BF16 (``vdpbf16ps``: 16 float32 lanes, each
  adding the products of one *pair* of bf16 values along K) in a 6 x 64
  register-blocked microkernel (24 zmm accumulators), K in blocks of 256.
* ``"fp32-fallback"`` -- elsewhere (e.g. Zen 3, AVX2 only): column tiles of
  the weight widened to float32 (exact, :mod:`numoe._cpu._narrow`) times the
  widened bf16 activations with ``np.matmul`` (the sgemm NumPy ships).

Every path computes the float32-accumulated product of ``bf16(a)`` (float
activations are rounded to bfloat16, nearest even) and the bf16 weight ``w``;
they differ only in the order and grouping of the float32 additions, and the
bf16 instructions treat subnormal bf16 inputs as zero and flush subnormal
results (DAZ/FTZ). ``NUMOE_FORCE_FALLBACK=1`` in the environment (read at each
call) or ``force="fallback"`` selects the fallback on any CPU;
``force="avx512_bf16"`` skips AMX.

Determinism and batch invariance (AMX and AVX512-BF16 paths): each output
element is one fixed sequence of bf16-pair steps over K, whatever row block,
column panel or K block it sits in (tail rows run on zero-padded scratch or
on the same instructions with fewer rows; accumulators that go through
memory between K blocks keep every bit). So a row's result depends neither
on the other rows of ``a`` nor on threads. The fallback inherits sgemm's
behaviour: deterministic for a fixed shape, but OpenBLAS may pick another
kernel for another M, so row independence is not promised there.

Memory: a packed weight (:func:`pack_bf16`) holds the bf16 bytes (plus zero
padding to a multiple of 32 along K and of 64 along N), never a float32 copy;
a call allocates the rounded activations and their blocked copy (about
``4 * M * K`` bytes) and, on the fallback, one ``[K, 256]`` float32 weight
tile plus ``6 * M * K`` bytes.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import _dtypes as D
from .._jit import kernel
from ._narrow import BF16, bf16_to_f32, f32_to_bf16, widen_cols

#: vdpbf16ps microkernel: rows x (16-lane vectors) of float32 accumulators.
MR = 6
NV = 4
#: Columns per packed panel (``16 * NV``; on AMX, four B tiles of 16 columns).
NR = 16 * NV
#: K pairs per cache block on the vdpbf16ps path (256 values of K: 32 KiB of a panel).
KC = 128
#: K pairs per AMX step (one 16-row B tile); the packed K is padded to a multiple.
KSTEP = 16
#: Columns widened per fallback tile (a ``[K, NB]`` float32 tile).
NB = 256

AMX = "amx_bf16"
AVX512 = "avx512_bf16"
FALLBACK = "fp32-fallback"
_RANK = {FALLBACK: 0, AVX512: 1, AMX: 2}
_STATE = {}


# ------------------------------------------------------------- detection
def _cpu_flags():
    """LLVM's feature flags for the CPU Numba compiles for (a set of ``+name``; kept)."""
    if "flags" not in _STATE:
        import numba
        from llvmlite import binding as llvm

        feats = numba.config.CPU_FEATURES
        if feats is None and numba.config.CPU_NAME not in (None, "host"):
            feats = ""
        elif feats is None:
            feats = llvm.get_host_cpu_features().flatten()
        _STATE["flags"] = frozenset(feats.split(","))
    return _STATE["flags"]


def has_avx512_bf16():
    """Whether the CPU Numba compiles for has AVX512-BF16 (``vdpbf16ps``).

    Reads the features LLVM reports for the host (they reflect OS support of
    the AVX-512 state too), or ``NUMBA_CPU_FEATURES`` when set; a non-host
    ``NUMBA_CPU_NAME`` without explicit features counts as no.

    Returns
    -------
    bool
    """
    return {"+avx512f", "+avx512bf16"} <= _cpu_flags()


def has_amx_bf16():
    """Whether AMX-BF16 tiles are usable here (CPU flags and the Linux permission).

    The first call on a CPU with the flags asks Linux for the AMX tile state
    (``arch_prctl(ARCH_REQ_XCOMP_PERM, 18)``, process wide, Linux >= 5.16);
    the answer is kept for the process.

    Returns
    -------
    bool
    """
    if "amx" not in _STATE:
        ok = {"+amx-tile", "+amx-bf16", "+avx512bf16"} <= _cpu_flags()
        if ok and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                # SYS_arch_prctl (x86-64) = 158, ARCH_REQ_XCOMP_PERM = 0x1023, XTILEDATA = 18
                ok = libc.syscall(158, 0x1023, 18) == 0
            except (OSError, AttributeError):
                ok = False
        else:
            ok = False
        _STATE["amx"] = ok
    return _STATE["amx"]


def _best():
    if has_amx_bf16():
        return AMX
    return AVX512 if has_avx512_bf16() else FALLBACK


def isa_path(force=None):
    """The path :func:`bf16_matmul` takes: ``"amx_bf16"``, ``"avx512_bf16"`` or ``"fp32-fallback"``.

    Parameters
    ----------
    force : {None, "auto", "amx_bf16", "avx512_bf16", "fallback", "fp32-fallback"}, optional
        The best path to allow (the CPU may offer less); ``None`` reads the
        environment variable ``NUMOE_FORCE_FALLBACK`` (``1`` forces the
        fallback), else ``"auto"``.

    Returns
    -------
    str
    """
    if force is None:
        env = os.environ.get("NUMOE_FORCE_FALLBACK", "")
        force = "fallback" if env not in ("", "0") else "auto"
    if force == "fallback":
        force = FALLBACK
    if force != "auto" and force not in _RANK:
        raise ValueError(f"force must be None, 'auto', 'amx_bf16', 'avx512_bf16' or 'fallback', "
                         f"got {force!r}")
    if force == FALLBACK:
        return FALLBACK
    best = _best()
    return best if force == "auto" or _RANK[best] <= _RANK[force] else force


# ----------------------------------------------------------- LLVM pieces
class _BFloat(ir.Type):
    """LLVM's ``bfloat`` type (llvmlite has no class for it)."""

    def _to_string(self):
        return "bfloat"


_V16F = ir.VectorType(ir.FloatType(), 16)
_V16I = ir.VectorType(ir.IntType(32), 16)
_V32BF = ir.VectorType(_BFloat(), 32)
_I8 = ir.IntType(8)
_I64 = ir.IntType(64)
_P8 = _I8.as_pointer()


def _c64(v):
    return ir.Constant(_I64, v)


def _declare(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _make_vdp_kernel(mr, nv):
    """An intrinsic ``mk(a, a_off, lda, b, b_off, c, c_off, ldc, npairs, load)`` (vdpbf16ps).

    ``a``: uint32 pairs of bf16 activations (``a[a_off + p*lda + r]``: rows interleaved),
    ``b``: packed uint32 weight pairs (``b[b_off + p*16*nv + lane]``),
    ``c``: float32 (``c[c_off + r*ldc + lane]``) for ``r < mr``,
    ``lane < 16*nv``, ``p < npairs`` (offsets in elements); ``load``
    continues from ``c``'s values, else starts from zero. The accumulators
    are allocas that LLVM promotes to ``mr * nv`` zmm registers.
    """
    @intrinsic
    def mk(typingctx, a, a_off, lda, b, b_off, c, c_off, ldc, npairs, load):
        sig = types.void(a, a_off, lda, b, b_off, c, c_off, ldc, npairs, load)

        def codegen(context, builder, signature, args):
            aty, bty, cty = signature.args[0], signature.args[3], signature.args[5]
            ap = context.make_array(aty)(context, builder, args[0]).data
            bp = context.make_array(bty)(context, builder, args[3]).data
            cp = context.make_array(cty)(context, builder, args[5]).data
            a_off, lda, b_off, c_off, ldc, npairs = [
                context.cast(builder, args[i], signature.args[i], types.int64)
                for i in (1, 2, 4, 6, 7, 8)]
            load = context.cast(builder, args[9], signature.args[9], types.boolean)
            dp = _declare(builder, "llvm.x86.avx512bf16.dpbf16ps.512", _V16F,
                          [_V16F, _V32BF, _V32BF])
            accs = [[cgutils.alloca_once(builder, _V16F) for _ in range(nv)] for _ in range(mr)]

            def cptr(r, v):
                off = builder.add(builder.add(c_off, builder.mul(_c64(r), ldc)), _c64(16 * v))
                return builder.bitcast(builder.gep(cp, [off]), _V16F.as_pointer())

            for r in range(mr):
                for v in range(nv):
                    builder.store(ir.Constant(_V16F, [0.0] * 16), accs[r][v])
            with builder.if_then(load):
                for r in range(mr):
                    for v in range(nv):
                        builder.store(builder.load(cptr(r, v), align=4), accs[r][v])
            with cgutils.for_range(builder, npairs) as loop:
                p = loop.index
                brow = builder.add(b_off, builder.mul(p, _c64(16 * nv)))
                bv = []
                for v in range(nv):
                    q = builder.gep(bp, [builder.add(brow, _c64(16 * v))])
                    x = builder.load(builder.bitcast(q, _V16I.as_pointer()), align=4)
                    bv.append(builder.bitcast(x, _V32BF))
                for r in range(mr):
                    off = builder.add(builder.add(a_off, builder.mul(p, lda)), _c64(r))
                    s = builder.load(builder.gep(ap, [off]), align=4)
                    s = builder.insert_element(ir.Constant(_V16I, None), s,
                                               ir.Constant(ir.IntType(32), 0))
                    s = builder.shuffle_vector(s, ir.Constant(_V16I, None),
                                               ir.Constant(_V16I, [0] * 16))
                    av = builder.bitcast(s, _V32BF)
                    for v in range(nv):
                        builder.store(builder.call(dp, [builder.load(accs[r][v]), av, bv[v]]),
                                      accs[r][v])
            for r in range(mr):
                for v in range(nv):
                    builder.store(builder.load(accs[r][v]), cptr(r, v), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return mk


def _make_amx_kernel(mt):
    """An intrinsic ``amx(cfg, a, a_off, lda, b, b_off, c, c_off, ldc, nsteps)`` (AMX-BF16).

    Computes a ``16*mt`` x 32 float32 block ``c`` from zero over ``nsteps``
    K steps of 32: A tiles ``[16 rows, 32 bf16]`` at ``a + a_off + t*lda +
    s*1024`` (row tile ``t``, stride 64 bytes), B tiles ``[16 pairs, 16
    columns x 2]`` at ``b + b_off + s*4096 + 64*u`` (column tile ``u``, the
    64-column panel's 256-byte rows), C tiles at ``c + c_off + t*16*ldc +
    64*u`` (stride ``ldc``). Offsets and strides in bytes; ``cfg`` is the
    64-byte tile configuration (palette 1, 8 tiles of 16 rows x 64 bytes).
    Tiles 0-3: C, 4-5: A, 6-7: B.
    """
    @intrinsic
    def amx(typingctx, cfg, a, a_off, lda, b, b_off, c, c_off, ldc, nsteps):
        sig = types.void(cfg, a, a_off, lda, b, b_off, c, c_off, ldc, nsteps)

        def codegen(context, builder, signature, args):
            def ptr(i):
                arr = context.make_array(signature.args[i])(context, builder, args[i])
                return builder.bitcast(arr.data, _P8)

            cfgp, ap, bp, cp = ptr(0), ptr(1), ptr(4), ptr(6)
            a_off, lda, b_off, c_off, ldc, nsteps = [
                context.cast(builder, args[i], signature.args[i], types.int64)
                for i in (2, 3, 5, 7, 8, 9)]
            void = ir.VoidType()
            ldcfg = _declare(builder, "llvm.x86.ldtilecfg", void, [_P8])
            tload = _declare(builder, "llvm.x86.tileloadd64", void, [_I8, _P8, _I64])
            tstore = _declare(builder, "llvm.x86.tilestored64", void, [_I8, _P8, _I64])
            tzero = _declare(builder, "llvm.x86.tilezero", void, [_I8])
            tdp = _declare(builder, "llvm.x86.tdpbf16ps", void, [_I8, _I8, _I8])

            def t8(i):
                return ir.Constant(_I8, i)

            builder.call(ldcfg, [cfgp])
            for t in range(mt):
                for u in range(2):
                    builder.call(tzero, [t8(2 * t + u)])
            with cgutils.for_range(builder, nsteps) as loop:
                s = loop.index
                ao = builder.add(a_off, builder.mul(s, _c64(1024)))
                bo = builder.add(b_off, builder.mul(s, _c64(16 * 4 * NR)))
                for t in range(mt):
                    q = builder.add(ao, builder.mul(_c64(t), lda))
                    builder.call(tload, [t8(4 + t), builder.gep(ap, [q]), _c64(64)])
                for u in range(2):
                    q = builder.add(bo, _c64(64 * u))
                    builder.call(tload, [t8(6 + u), builder.gep(bp, [q]), _c64(4 * NR)])
                for t in range(mt):
                    for u in range(2):
                        builder.call(tdp, [t8(2 * t + u), t8(4 + t), t8(6 + u)])
            for t in range(mt):
                for u in range(2):
                    q = builder.add(c_off, builder.add(builder.mul(_c64(16 * t), ldc),
                                                       _c64(64 * u)))
                    builder.call(tstore, [t8(2 * t + u), builder.gep(cp, [q]), ldc])
            return context.get_dummy_value()

        return sig, codegen

    return amx


@intrinsic
def _amx_release(typingctx):
    """``tilerelease``: hand the AMX tile state back (end of a product)."""
    def codegen(context, builder, signature, args):
        builder.call(_declare(builder, "llvm.x86.tilerelease", ir.VoidType(), []), [])
        return context.get_dummy_value()

    return types.void(), codegen


_mk1, _mk2, _mk3, _mk4, _mk5, _mk6 = (_make_vdp_kernel(r, NV) for r in range(1, 7))
_amx16 = _make_amx_kernel(1)
_amx32 = _make_amx_kernel(2)


def _tile_config():
    """The AMX tile configuration: palette 1, tiles 0-7 of 16 rows x 64 bytes."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    cfg[16:32].view(np.uint16)[:] = 64
    cfg[48:56] = 16
    return cfg


# ---------------------------------------------------------------- kernels
@kernel
def _mk_rows(mr, a, a_off, lda, b, b_off, c, c_off, ldc, npairs, load):
    """The vdpbf16ps microkernel for ``mr`` (1..6) rows: the same lane steps for every ``mr``."""
    if mr == 6:
        _mk6(a, a_off, lda, b, b_off, c, c_off, ldc, npairs, load)
    elif mr == 5:
        _mk5(a, a_off, lda, b, b_off, c, c_off, ldc, npairs, load)
    elif mr == 4:
        _mk4(a, a_off, lda, b, b_off, c, c_off, ldc, npairs, load)
    elif mr == 3:
        _mk3(a, a_off, lda, b, b_off, c, c_off, ldc, npairs, load)
    elif mr == 2:
        _mk2(a, a_off, lda, b, b_off, c, c_off, ldc, npairs, load)
    else:
        _mk1(a, a_off, lda, b, b_off, c, c_off, ldc, npairs, load)


@kernel
def _round_rows(a, ab):
    """``ab[i, :K] = bf16 bits of a[i, :]`` (nearest even), zero padding after K."""
    M, K = a.shape
    for i in range(M):
        for j in range(K):
            ab[i, j] = f32_to_bf16(np.float32(a[i, j]))
        for j in range(K, ab.shape[1]):
            ab[i, j] = np.uint16(0)


@kernel
def _copy_bits(a, ab):
    """``ab[i, :K] = a[i, :]`` (bf16 bits already), zero padding after K."""
    M, K = a.shape
    for i in range(M):
        for j in range(K):
            ab[i, j] = a[i, j]
        for j in range(K, ab.shape[1]):
            ab[i, j] = np.uint16(0)


@kernel
def _interleave_rows(a2, ai):
    """``ai[i // MR, p, i % MR] = a2[i, p]`` (zero rows past ``a2``): each microkernel call
    reads one contiguous stream of activation pairs."""
    M = a2.shape[0]
    nb, Kp2, mr = ai.shape
    for ib in range(nb):
        for p in range(Kp2):
            for r in range(mr):
                i = ib * mr + r
                ai[ib, p, r] = a2[i, p] if i < M else np.uint32(0)


@kernel
def _tile_rows(ab, at):
    """``at[i // 16, s, i % 16, :] = ab[i, 32 s: 32 s + 32]`` (zero rows past ``ab``)."""
    M = ab.shape[0]
    nb, ns, _, w = at.shape
    for ib in range(nb):
        for s in range(ns):
            for r in range(16):
                i = ib * 16 + r
                if i < M:
                    for j in range(w):
                        at[ib, s, r, j] = ab[i, s * w + j]
                else:
                    for j in range(w):
                        at[ib, s, r, j] = np.uint16(0)


@kernel
def _pack_block(wb, p0, p1, blk):
    """``blk[jp, q, c] = wb[2p, n] | wb[2p + 1, n] << 16`` (uint32: the bf16 pair of K rows
    ``2p, 2p+1`` at column ``n = jp*NR + c``) for ``p = p0 + q < p1``, zero outside ``wb``.

    ``blk [Np, >= p1 - p0, NR]``. Reads whole weight rows front to back (the
    contiguous order the memory system streams best).
    """
    K, N = wb.shape
    Np, _, nr = blk.shape
    full = N // nr
    for q in range(p1 - p0):
        k = 2 * (p0 + q)
        if k + 1 < K:
            r0 = wb[k]
            r1 = wb[k + 1]
            for jp in range(full):
                d = blk[jp, q]
                a0 = r0[jp * nr:jp * nr + nr]      # slices indexed from 0: vector loads
                a1 = r1[jp * nr:jp * nr + nr]
                for c in range(nr):
                    d[c] = np.uint32(a0[c]) | (np.uint32(a1[c]) << np.uint32(16))
            j0 = full
        else:
            j0 = 0
        for jp in range(j0, Np):              # the last partial panel, the odd or padded K
            d = blk[jp, q]
            for c in range(nr):
                n = jp * nr + c
                lo = np.uint32(wb[k, n]) if k < K and n < N else np.uint32(0)
                hi = np.uint32(wb[k + 1, n]) if k + 1 < K and n < N else np.uint32(0)
                d[c] = lo | (hi << np.uint32(16))


@kernel
def _gemm_avx512(a2, Kp2, b, wb, out, ctail, mr_max, kc):
    """``out[M, N] = a @ w`` with vdpbf16ps on uint32 pair layouts.

    ``a2 [ceil(M / mr_max) * Kp2 * mr_max]`` activation pairs, blocks of
    ``mr_max`` rows interleaved (:func:`_interleave_rows`); ``ctail [M, NR]``
    scratch for a last, partial panel. The weight is either packed whole,
    ``b [Np, Kp2, NR]`` (:func:`pack_bf16`; ``wb`` empty), or raw bf16 bits
    ``wb [K, N]`` packed ``kc`` pairs at a time into the block buffer ``b [Np,
    min(kc, Kp2), NR]`` (:func:`_pack_block`, L2-sized) just before the
    microkernels use it. Either way each output element gets the same
    microkernel steps on the same values: the same bits.
    """
    M, N = out.shape
    Np, kb, nr = b.shape
    full = N // nr
    flat = b.reshape(-1)
    blocked = wb.shape[0] > 0
    for k0 in range(0, Kp2, kc):
        k1 = min(k0 + kc, Kp2)
        if blocked:
            _pack_block(wb, k0, k1, b)
        load = k0 > 0
        for jp in range(Np):
            b_off = (jp * kb + (0 if blocked else k0)) * nr
            for i0 in range(0, M, mr_max):
                mr = min(mr_max, M - i0)
                if jp < full:
                    _mk_rows(mr, a2, (i0 * Kp2 + k0 * mr_max), mr_max, flat, b_off, out,
                             i0 * N + jp * nr, N, k1 - k0, load)
                else:
                    _mk_rows(mr, a2, (i0 * Kp2 + k0 * mr_max), mr_max, flat, b_off, ctail,
                             i0 * nr, nr, k1 - k0, load)
    if full < Np:
        n0 = full * nr
        for i in range(M):
            for j in range(N - n0):
                out[i, n0 + j] = ctail[i, j]


@kernel
def _gemm_amx(cfg, at, b, Kp2, out, ctile):
    """``out[M, N] = a @ w`` with AMX tiles: ``at [M32/16, Kp2/16, 16, 32]`` (tiled
    activation bits, zero rows up to a multiple of 32), ``b [Np, Kp2, 64, 2]``
    (panels), ``ctile [32, 32]`` scratch for partial blocks."""
    M, N = out.shape
    Np = b.shape[0]
    nsteps = Kp2 // 16
    lda = nsteps * 1024
    ldc = N * 4
    for jp in range(Np):
        for h in range(2):
            n0 = jp * 64 + h * 32
            if n0 >= N:
                break
            ncols = min(32, N - n0)
            b_off = jp * Kp2 * 256 + h * 128
            for i0 in range(0, M, 32):
                rows = min(32, M - i0)
                a_off = (i0 // 16) * lda
                if ncols == 32 and rows == 32:
                    _amx32(cfg, at, a_off, lda, b, b_off, out, (i0 * N + n0) * 4, ldc, nsteps)
                elif ncols == 32 and rows == 16:
                    _amx16(cfg, at, a_off, lda, b, b_off, out, (i0 * N + n0) * 4, ldc, nsteps)
                else:
                    if rows <= 16:
                        _amx16(cfg, at, a_off, lda, b, b_off, ctile, 0, 128, nsteps)
                    else:
                        _amx32(cfg, at, a_off, lda, b, b_off, ctile, 0, 128, nsteps)
                    for r in range(rows):
                        for j in range(ncols):
                            out[i0 + r, n0 + j] = ctile[r, j]
    _amx_release()


@kernel
def _widen_panels(b, c0, c1, out):
    """``out[k, j] = w[k, c0 + j]`` (float32, ``k < out.shape[0]``) from the panels ``b``."""
    K = out.shape[0]
    nr = b.shape[2]
    for k in range(K):
        p = k // 2
        t = k - 2 * p
        for j in range(c1 - c0):
            n = c0 + j
            out[k, j] = bf16_to_f32(b[n // nr, p, n % nr, t])


@kernel
def _widen_bits_rows(ab, af):
    """``af[i, j] = float32(ab[i, j])`` for ``j < af.shape[1]`` (bf16 bits, exact)."""
    for i in range(af.shape[0]):
        for j in range(af.shape[1]):
            af[i, j] = bf16_to_f32(ab[i, j])


# ------------------------------------------------------------- host side
class PackedBF16(NamedTuple):
    """A bfloat16 weight ``[K, N]`` ready for :func:`bf16_matmul`.

    ``layout == "panels"`` (AMX and AVX512-BF16 paths): ``data`` is ``uint16
    [Np, Kp2, 64, 2]``: panels of 64 columns, K in interleaved pairs, zero
    padded to a multiple of 32 along K and of 64 along N (``4 * Kp2 * 64 * Np``
    bytes: the bf16 weight's own size plus padding, no float32 copy).
    ``layout == "kn"`` (fallback): ``data`` is the unchanged ``uint16 [K, N]``
    bits (a view, no copy).
    """

    data: np.ndarray
    k: int
    n: int
    layout: str


def _as_bits(name, w):
    if not isinstance(w, np.ndarray) or w.dtype not in (D.BFLOAT16, np.dtype(np.uint16)):
        raise TypeError(f"{name} must be a bfloat16 (or uint16 bits) array, "
                        f"got {getattr(w, 'dtype', type(w).__name__)}")
    if w.ndim != 2:
        raise ValueError(f"{name} must be 2-D [K, N], got shape {w.shape}")
    return np.ascontiguousarray(w.view(np.uint16))


def pack_bf16(w, force=None):
    """Pack a bfloat16 weight ``[K, N]`` (the ``x @ W`` layout) for :func:`bf16_matmul`.

    Do this once per weight (e.g. when a layer is built): on the AMX and
    AVX512-BF16 paths it copies the weight into 64-column panels with K in
    pairs (the bf16 bytes plus padding, see :class:`PackedBF16`); on the
    fallback path it keeps the bits as they are (no copy).

    Parameters
    ----------
    w : ndarray [K, N], bfloat16 (or its uint16 bits)
    force : str, optional
        As in :func:`isa_path`.

    Returns
    -------
    PackedBF16
    """
    wb = _as_bits("w", w)
    K, N = wb.shape
    if isa_path(force) == FALLBACK:
        return PackedBF16(wb, K, N, "kn")
    kp2 = -(-K // (2 * KSTEP)) * KSTEP
    out = np.empty((-(-N // NR), kp2, NR, 2), np.uint16)
    _pack_block(wb, 0, kp2, out.view(np.uint32).reshape(out.shape[:3]))
    return PackedBF16(out, K, N, "panels")


_NO_BITS = np.zeros((0, 0), np.uint16)     # "the weight is packed already"


def _round_activations(a, width):
    """bf16 bits of ``a`` in a ``[M, width]`` zero-padded scratch."""
    ab = np.empty((a.shape[0], width), np.uint16)
    if a.dtype == D.BFLOAT16 or a.dtype == np.uint16:
        _copy_bits(a.view(np.uint16), ab)
    else:
        _round_rows(a, ab)
    return ab


def _check_a(a, K, N):
    if not isinstance(a, np.ndarray) or not (D.native(a.dtype) in D.FLOATS
                                             or a.dtype == np.uint16):
        raise TypeError(f"a must be a float or bfloat16 array, got {getattr(a, 'dtype', type(a))}")
    if a.ndim != 2 or a.shape[1] != K:
        raise ValueError(f"a must be [M, {K}] for a weight [{K}, {N}], got shape {a.shape}")
    if D.native(a.dtype) == D.FLOAT16:
        return a.astype(np.float32)
    if a.dtype in (np.dtype(np.uint16), D.BFLOAT16):
        return a
    return np.ascontiguousarray(a, dtype=D.native(a.dtype))


def bf16_matmul(a, w, out=None, *, force=None):
    """``out = bf16(a) @ w`` with float32 accumulation (single-threaded, releases the GIL).

    Parameters
    ----------
    a : ndarray [M, K], float16/32/64 (rounded to bfloat16, nearest even),
        or bfloat16 (or its uint16 bits, used as they are)
    w : PackedBF16, or ndarray [K, N] bfloat16 (or uint16 bits)
        The weight; pack it once with :func:`pack_bf16` when it is reused.
        A raw array is packed whole on every call on the AMX path, and 128
        K-pairs at a time inside the product on the AVX512-BF16 path (the
        same bits as packed once). A weight packed for the fallback
        (``layout == "kn"``) runs the fallback.
    out : ndarray [M, N] float32, C-contiguous, optional
        Written in full (not accumulated into).
    force : str, optional
        As in :func:`isa_path`.

    Returns
    -------
    out : ndarray [M, N] float32
        The float32-accumulated product of the bf16-rounded ``a`` and ``w``
        (see the module notes on order, DAZ/FTZ and row independence).

    Examples
    --------
    >>> import numpy as np, ml_dtypes
    >>> w = np.ones((3, 2), ml_dtypes.bfloat16)
    >>> bf16_matmul(np.ones((1, 3), np.float32), pack_bf16(w))
    array([[3., 3.]], dtype=float32)
    """
    path = isa_path(force)
    blocked = path == AVX512 and not isinstance(w, PackedBF16)   # packed inside the product
    if blocked:
        wb = _as_bits("w", w)
        K, N = wb.shape
    else:
        if not isinstance(w, PackedBF16):
            w = pack_bf16(w, force=force)
        K, N = w.k, w.n
    a = _check_a(a, K, N)
    M = a.shape[0]
    if out is None:
        out = np.empty((M, N), np.float32)
    elif (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (M, N)
          or not out.flags.c_contiguous):
        raise ValueError(f"out must be a C-contiguous float32 array of shape {(M, N)}")
    if M == 0 or N == 0:
        return out
    if K == 0:
        out[...] = 0.0
        return out
    if blocked or (path != FALLBACK and w.layout == "panels"):
        Kp2 = -(-K // 2) if blocked else w.data.shape[1]
        ab = _round_activations(a, 2 * Kp2)
        if path == AMX:
            at = np.empty((-(-M // 32) * 2, Kp2 // KSTEP, 16, 32), np.uint16)
            _tile_rows(ab, at)
            _gemm_amx(_tile_config(), at, w.data, Kp2, out, np.empty((32, 32), np.float32))
        else:
            ai = np.empty((-(-M // MR), Kp2, MR), np.uint32)
            _interleave_rows(ab.view(np.uint32), ai)
            ctail = np.empty((M, NR) if N % NR else (0, NR), np.float32)
            if blocked:
                b = np.empty((-(-N // NR), min(KC, Kp2), NR), np.uint32)
            else:
                b, wb = w.data.view(np.uint32).reshape(w.data.shape[:3]), _NO_BITS
            _gemm_avx512(ai.reshape(-1), Kp2, b, wb, out, ctail, MR, KC)
        return out
    # fp32 fallback: widen column tiles of w, multiply the widened bf16(a) with sgemm
    af = np.empty((M, K), np.float32)
    _widen_bits_rows(_round_activations(a, K), af)
    tile = np.empty((K, min(NB, N)), np.float32)
    empty = np.empty(0, np.float32)
    for c0 in range(0, N, NB):
        c1 = min(c0 + NB, N)
        if w.layout == "kn":
            widen_cols(w.data, BF16, empty, c0, c1, tile, 0)
        else:
            _widen_panels(w.data, c0, c1, tile)
        if c1 - c0 == N:
            np.matmul(af, tile, out=out)
        else:
            out[:, c0:c1] = af @ tile[:, :c1 - c0]
    return out


def _bench(ms=(16, 64, 256), k=2048, n=2048, repeat=15, seed=0):
    """GFLOP/s of each path on one thread (median and best of ``repeat``), for the docs.

    ``python -c "from numoe._cpu.bf16gemm import _bench; _bench()"``: packed
    weight; the fallback packs for itself ("kn"); ``np.matmul f32`` is sgemm
    on a float32 copy of the weight. Paths this CPU lacks are left out.
    Timed with the calling thread's CPU time (``time.thread_time``: every
    path runs on the calling thread), so time spent descheduled on a busy
    machine does not count; a busy sibling hyperthread still does.
    """
    import time

    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(seed)
    paths = [p for p in (AMX, AVX512) if isa_path(p) == p] + [FALLBACK]
    print(f"bf16_matmul, 1 thread, K={k}, N={n}; GFLOP/s of thread CPU time, median (best) "
          f"of {repeat}; "
          f"best path here: {isa_path('auto')}")
    with threadpool_limits(1):
        for m in ms:
            a = rng.standard_normal((m, k), dtype=np.float32)
            wf = rng.standard_normal((k, n), dtype=np.float32)
            w = wf.astype(D.BFLOAT16)
            out = np.empty((m, n), np.float32)
            calls = {p: (lambda p=p, pw=pack_bf16(w, force=p): bf16_matmul(a, pw, out, force=p))
                     for p in paths}
            calls["np.matmul f32"] = lambda: np.matmul(a, wf, out=out)
            row = []
            for name, f in calls.items():
                f()
                ts = []
                for _ in range(repeat):
                    t0 = time.thread_time()
                    f()
                    ts.append(time.thread_time() - t0)
                fl = 2.0 * m * k * n / 1e9
                row.append(f"{name} {fl / np.median(ts):6.1f} ({fl / min(ts):6.1f})")
            print(f"M={m:4d}  " + "  ".join(row))
