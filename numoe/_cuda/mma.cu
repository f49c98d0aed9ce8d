// Tensor-core grouped GEMM tiles for numoe's expert FFN (bfloat16 / float16).
//
// Linked into numba @cuda.jit kernels (numoe/_cuda/mma.py) through
// cuda.declare_device; compiled by NVRTC with no headers (WMMA's mma.h is not
// available there), so everything below is plain C++ plus inline PTX:
// cp.async (4-stage global->shared pipeline), ldmatrix (A as is, the x @ W
// weight tile transposed on the fly) and mma.sync.m16n8k16 with float32
// accumulators. Needs compute capability >= 8.0, rows of 16 bytes (K and the
// output width multiples of 8) and 16-byte aligned base pointers; the Python
// side checks that and otherwise keeps the numba kernels.
//
// A block (128 threads, 2 x 2 warps) owns a BM x BN output tile of one expert
// (BM = 32 or 64 rows; each warp BM / 2 rows and half the columns):
//   GLU  (gate and up, BN = 64 columns of each): h = act(A Wg + bg) * (A Wu + bu)
//   plain (BN = 128): out = act(A W + b) * scale[row]     (code < 0: no act)
// The (expert, first row, end row) tiles come from a device table; A rows are
// read in place or through the plan (row gidx[r] / kdiv of the token matrix).
// Every output element is one thread's fixed-order sum: deterministic.

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define NUMOE_BK 32
#define NUMOE_STAGES 4
#define NUMOE_LDA (NUMOE_BK + 8)            // u16 per A row in shared memory
#define NUMOE_B_ELEMS 4608                   // >= 2 * 32 * 72 (GLU) and 32 * 136 (plain)

// The stages live in dynamic shared memory: (BM * LDA + B_ELEMS) * STAGES u16 =
// 47,104 / 57,344 bytes for 32- / 64-row tiles (mma.py raises the kernels' dynamic
// shared memory limit above the default 48 KB).
extern __shared__ __align__(16) u16 numoe_mma_smem[];

__device__ __forceinline__ u32 numoe_saddr(const void* p) {
    u32 r;
    asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }"
                 : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ void numoe_cp16(u32 dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(dst), "l"(src), "r"(bytes) : "memory");
}

__device__ __forceinline__ void numoe_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}

template <int N>
__device__ __forceinline__ void numoe_wait() {
    asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}

__device__ __forceinline__ void numoe_ldsm4(u32 addr, u32* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ void numoe_ldsm4t(u32 addr, u32* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

template <bool BF>
__device__ __forceinline__ void numoe_mma(float* c, const u32* a, u32 b0, u32 b1) {
    if (BF) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// float32 -> 16-bit bits, round to nearest even (the same rounding as numoe's
// widening helper and ml_dtypes)
template <bool BF>
__device__ __forceinline__ u16 numoe_narrow(float v) {
    u16 h;
    if (BF) {
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    } else {
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    }
    return h;
}

__device__ __forceinline__ float numoe_act(float v, i64 code) {
    if (code == 0) return v / (1.0f + expf(-v));
    if (code == 1) return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    if (code == 2) {
        float t = tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v));
        return 0.5f * v * (1.0f + t);
    }
    if (code == 3) return v < 0.0f ? 0.0f : v;
    return v;
}

__device__ __forceinline__ float numoe_glu(float g, float u, i64 code, float limit,
                                           float alpha) {
    if (code == 4) {
        if (g > limit) g = limit;
        if (u > limit) u = limit;
        else if (u < -limit) u = -limit;
        return (u + 1.0f) * g / (1.0f + expf(-alpha * g));
    }
    return numoe_act(g, code) * u;
}

// One tile loop. GLU: NW = 2 weights, BN = 64; plain: NW = 1, BN = 128. MI m16 tiles
// per warp row: BM = 32 * MI rows per tile (32 or 64). blockIdx.x picks the output
// columns and blockIdx.y strides over the row tiles, so the blocks running together
// share one expert's A rows and weights in L2. Not inlined: each instantiation gets
// its own register allocation (inlined into one entry point, ptxas spilled in loops).
template <bool GLU, bool BF, int MI>
__device__ __noinline__ void numoe_mma_body(
        const u16* a, const i64* gidx, i64 kdiv, i64 K, const u16* w1, const u16* w2, i64 NO,
        const float* b1, i64 use_b1, const float* b2, i64 use_b2, i64 code, float limit,
        float alpha, const i64* sidx, const float* sval, i64 use_scale, u16* out16,
        float* out32, i64 out_f32, const i64* tiles, const i64* tcount, i64 which) {
    constexpr int NW = GLU ? 2 : 1;
    constexpr int BM = 32 * MI;
    constexpr int BN = GLU ? 64 : 128;
    constexpr int LDB = BN + 8;
    constexpr int WN = BN / 2;            // columns per warp
    constexpr int NTN = WN / 8;           // n8 tiles per warp
    constexpr int BCH = BN / 8;           // 16-byte chunks per weight row
    constexpr int A_ELEMS = BM * NUMOE_LDA;
    constexpr int STAGE = A_ELEMS + NUMOE_B_ELEMS;
    constexpr int ACH = BM * NUMOE_BK / 8 / 128;       // A chunks per thread (1 or 2)
    constexpr int BCHT = NW * NUMOE_BK * BCH / 128;    // weight chunks per thread (4)
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int wm = warp >> 1;
    const int wn = warp & 1;
    const i64 n0 = (i64)blockIdx.x * BN;
    const i64 ntiles = tcount[which];
    const i64 nk = (K + NUMOE_BK - 1) / NUMOE_BK;
    u16* smem = numoe_mma_smem;

    // this thread's weight chunks: fixed (row in the k slice, column, shared offset)
    int bk[BCHT], bsm[BCHT];
    i64 boff[BCHT];
    bool bsel[BCHT], bok[BCHT];
#pragma unroll
    for (int i = 0; i < BCHT; ++i) {
        int c = tid + i * 128;
        int wsel = GLU ? c / (NUMOE_BK * BCH) : 0;
        int cc = GLU ? c % (NUMOE_BK * BCH) : c;
        bk[i] = cc / BCH;
        int nc = (cc % BCH) * 8;
        bsel[i] = wsel != 0;
        bok[i] = n0 + nc < NO;
        boff[i] = (i64)bk[i] * NO + n0 + nc;
        bsm[i] = A_ELEMS + wsel * (NUMOE_BK * LDB) + bk[i] * LDB + nc;
    }

    for (i64 t = blockIdx.y; t < ntiles; t += gridDim.y) {
        const i64 e = tiles[3 * t];
        const i64 r0 = tiles[3 * t + 1];
        const i64 rend = tiles[3 * t + 2];
        // this thread's A chunks: source row starts (or -1) and k offsets
        i64 arow[ACH];
        int acol[ACH], asm_off[ACH];
#pragma unroll
        for (int i = 0; i < ACH; ++i) {
            int c = tid + i * 128;
            int row = c >> 2;
            acol[i] = (c & 3) * 8;
            asm_off[i] = row * NUMOE_LDA + acol[i];
            i64 r = r0 + row;
            arow[i] = -1;
            if (r < rend) arow[i] = (kdiv > 0 ? gidx[r] / kdiv : r) * K + acol[i];
        }
        const u16* wbase1 = w1 + (i64)e * K * NO;
        const u16* wbase2 = GLU ? w2 + (i64)e * K * NO : w1;

        auto load = [&](int stage, i64 kt) {
            u16* st = smem + stage * STAGE;
            i64 k0 = kt * NUMOE_BK;
#pragma unroll
            for (int i = 0; i < ACH; ++i) {
                bool ok = arow[i] >= 0 && k0 + acol[i] < K;
                const u16* src = ok ? a + arow[i] + k0 : a;
                numoe_cp16(numoe_saddr(st + asm_off[i]), src, ok ? 16 : 0);
            }
#pragma unroll
            for (int i = 0; i < BCHT; ++i) {
                bool ok = bok[i] && k0 + bk[i] < K;
                const u16* wb = bsel[i] ? wbase2 : wbase1;
                const u16* src = ok ? wb + k0 * NO + boff[i] : w1;
                numoe_cp16(numoe_saddr(st + bsm[i]), src, ok ? 16 : 0);
            }
        };

        float acc[NW][MI][NTN][4];
#pragma unroll
        for (int w = 0; w < NW; ++w)
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int nj = 0; nj < NTN; ++nj)
#pragma unroll
                    for (int q = 0; q < 4; ++q) acc[w][mi][nj][q] = 0.0f;

        for (int s = 0; s < NUMOE_STAGES - 1; ++s) {
            if (s < nk) load(s, s);
            numoe_commit();
        }
        for (i64 kt = 0; kt < nk; ++kt) {
            numoe_wait<NUMOE_STAGES - 2>();
            __syncthreads();
            i64 nxt = kt + NUMOE_STAGES - 1;
            if (nxt < nk) load((int)(nxt % NUMOE_STAGES), nxt);
            numoe_commit();
            const u16* sa = smem + (int)(kt % NUMOE_STAGES) * STAGE;
            const u16* sb = sa + A_ELEMS;
#pragma unroll
            for (int ks = 0; ks < NUMOE_BK; ks += 16) {
                u32 af[MI][4];
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    int row = wm * (BM / 2) + mi * 16 + (lane & 15);
                    int col = ks + (lane >> 4) * 8;
                    numoe_ldsm4(numoe_saddr(sa + row * NUMOE_LDA + col), af[mi]);
                }
#pragma unroll
                for (int w = 0; w < NW; ++w) {
#pragma unroll
                    for (int nj = 0; nj < NTN; nj += 2) {
                        u32 bf[4];
                        int krow = ks + (lane & 15);
                        int col = wn * WN + nj * 8 + (lane >> 4) * 8;
                        numoe_ldsm4t(numoe_saddr(sb + w * (NUMOE_BK * LDB) + krow * LDB + col),
                                     bf);
#pragma unroll
                        for (int mi = 0; mi < MI; ++mi) {
                            numoe_mma<BF>(acc[w][mi][nj], af[mi], bf[0], bf[1]);
                            numoe_mma<BF>(acc[w][mi][nj + 1], af[mi], bf[2], bf[3]);
                        }
                    }
                }
            }
        }
        numoe_wait<0>();
        __syncthreads();          // the next tile's prologue overwrites the stages

        // epilogue: bias, activation, scale, rounding; two columns per store
        const int g = lane >> 2;
        const int tg = lane & 3;
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                i64 r = r0 + wm * (BM / 2) + mi * 16 + g + half * 8;
                if (r >= rend) continue;
                float s = 1.0f;
                if (!GLU && use_scale) s = sval[sidx[r]];
#pragma unroll
                for (int nj = 0; nj < NTN; ++nj) {
                    i64 c = n0 + wn * WN + nj * 8 + tg * 2;
                    if (c >= NO) continue;
                    float v[2];
                    for (int q = 0; q < 2; ++q) {
                        float x = acc[0][mi][nj][half * 2 + q];
                        if (use_b1) x += b1[e * NO + c + q];
                        if (GLU) {
                            float u = acc[NW - 1][mi][nj][half * 2 + q];
                            if (use_b2) u += b2[e * NO + c + q];
                            x = numoe_glu(x, u, code, limit, alpha);
                        } else {
                            if (code >= 0) x = numoe_act(x, code);
                            x = x * s;
                        }
                        v[q] = x;
                    }
                    if (!GLU && out_f32) {
                        out32[r * NO + c] = v[0];
                        out32[r * NO + c + 1] = v[1];
                    } else {
                        u32 packed = (u32)numoe_narrow<BF>(v[0]) |
                                     ((u32)numoe_narrow<BF>(v[1]) << 16);
                        *reinterpret_cast<u32*>(out16 + r * NO + c) = packed;
                    }
                }
            }
        }
    }
}

// The two entry points: bfloat16 or float16, tiles of 32 * mi rows (mi = 1 or 2).
extern "C" __device__ int numoe_mma_glu(int* ret, const u16* a, const i64* gidx, i64 kdiv,
                                        i64 K, const u16* w1, const u16* w2, i64 NO,
                                        const float* b1, i64 use_b1, const float* b2,
                                        i64 use_b2, i64 code, double limit, double alpha,
                                        u16* out, const i64* tiles, const i64* tcount,
                                        i64 which, i64 is_bf16, i64 mi) {
#define NUMOE_GLU(BF, MI)                                                                  \
    numoe_mma_body<true, BF, MI>(a, gidx, kdiv, K, w1, w2, NO, b1, use_b1, b2, use_b2, code, \
                                 (float)limit, (float)alpha, (const i64*)0, (const float*)0, \
                                 0, out, (float*)0, 0, tiles, tcount, which)
    if (is_bf16) {
        if (mi == 2) NUMOE_GLU(true, 2);
        else NUMOE_GLU(true, 1);
    } else {
        if (mi == 2) NUMOE_GLU(false, 2);
        else NUMOE_GLU(false, 1);
    }
#undef NUMOE_GLU
    *ret = 0;
    return 0;
}

extern "C" __device__ int numoe_mma_plain(int* ret, const u16* a, const i64* gidx, i64 kdiv,
                                          i64 K, const u16* w1, i64 NO, const float* b1,
                                          i64 use_b1, i64 code, const i64* sidx,
                                          const float* sval, i64 use_scale, u16* out16,
                                          float* out32, i64 out_f32, const i64* tiles,
                                          const i64* tcount, i64 which, i64 is_bf16,
                                          i64 mi) {
#define NUMOE_PLAIN(BF, MI)                                                                 \
    numoe_mma_body<false, BF, MI>(a, gidx, kdiv, K, w1, w1, NO, b1, use_b1, b1, 0, code,     \
                                  0.0f, 1.0f, sidx, sval, use_scale, out16, out32, out_f32,  \
                                  tiles, tcount, which)
    if (is_bf16) {
        if (mi == 2) NUMOE_PLAIN(true, 2);
        else NUMOE_PLAIN(true, 1);
    } else {
        if (mi == 2) NUMOE_PLAIN(false, 2);
        else NUMOE_PLAIN(false, 1);
    }
#undef NUMOE_PLAIN
    *ret = 0;
    return 0;
}
