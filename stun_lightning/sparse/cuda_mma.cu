// Routed tokens times 2:4-compressed bf16 expert weights on the sparse tensor cores (mma.sp, sm_80+).
//
// Compiled at run time by NVRTC (stun_lightning/sparse/cuda_mma.py); no CUDA headers needed.
//
// One block of 16 (token, expert) pairs of one expert (align_pairs, block_m = 16) by WARPS * 16
// output rows per CTA; each warp owns 16 weight rows and runs mma.sp.m16n8k32 with the weight as
// the sparse A operand (rows = M) and the block's tokens as B (two n8 tiles). The kernel reads the
// compressed values and metadata in our own layout (format.py) with no reordering of the weights:
// per step of 64 inputs, lane (g, t) loads 16 contiguous bytes (groups 4t..4t+3) of rows g and
// g + 8, and the step's two mma instructions take groups {4t + 2m, 4t + 2m + 1} as their groups
// {t, t + 4}. The activations are permuted once per call to match (ACT_PERM in cuda_mma.py), so
// each B fragment is one 16-byte load, and the metadata nibbles are regrouped with shifts.
// blockIdx.z splits the input dimension (split-K) when few experts are routed; the partial sums
// are then float32 and added by the caller (inside the compiled graph, fused with what follows).

typedef unsigned int u32;
typedef unsigned long long u64;

struct alignas(16) U4 { u32 x, y, z, w; };

__device__ __forceinline__ U4 load_stream(const U4* p) {
  U4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

__device__ __forceinline__ U4 load_cached(const U4* p) {
  U4 r;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

__device__ __forceinline__ u64 load_meta(const u64* p) {
  u64 r;
  asm volatile("ld.global.nc.L1::no_allocate.u64 %0, [%1];" : "=l"(r) : "l"(p));
  return r;
}

// The 16 metadata bits of one row for one mma: nibbles p, p + 4, p + 8, p + 12 of a step's word.
__device__ __forceinline__ u32 meta_bits(u64 word, int p) {
  u64 s = word >> (4 * p);
  return (u32)((s & 0xFull) | ((s >> 12) & 0xF0ull) | ((s >> 24) & 0xF00ull) | ((s >> 36) & 0xF000ull));
}

__device__ __forceinline__ void mma_sp(float* d, u32 a0, u32 a1, u32 a2, u32 a3, const U4& b, u32 e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b.x), "r"(b.y), "r"(b.z), "r"(b.w), "r"(e));
}

__device__ __forceinline__ unsigned short to_bf16(float f) {
  u32 u = __float_as_uint(f);
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even (finite inputs)
  return (unsigned short)(u >> 16);
}

template <int WARPS, int UNROLL>
__global__ void __launch_bounds__(WARPS * 32) sparse24_mma(
    const U4* __restrict__ values,      // [E, N, K/2] bf16: K/16 16-byte units per row
    const u64* __restrict__ meta,       // [E, N, K/8] bytes: K/64 words per row
    const U4* __restrict__ act,         // [M, K] bf16, permuted per 64 inputs (permute_activations)
    const int* __restrict__ sorted_ids, // [n_blocks * 16]
    const int* __restrict__ block_expert,
    void* __restrict__ out,             // [n_pairs, N] bf16, or [splits, n_pairs, N] float32
    int N, int K, int n_pairs, int rows_per_a, int steps_per_split, int partial) {
  const int blk = blockIdx.x;
  const int e = block_expert[blk];
  if (e < 0) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = (blockIdx.y * WARPS + warp) * 16;
  if (row0 >= N) return;
  const int steps = K >> 6;
  const int c_begin = blockIdx.z * steps_per_split;
  const int c_end = steps < c_begin + steps_per_split ? steps : c_begin + steps_per_split;
  if (c_begin >= c_end) return;

  const long long units_per_row = K >> 4, words_per_row = K >> 6, act_units = K >> 3;
  const long long row_lo = (long long)e * N + row0 + g;
  const U4* a_lo = values + row_lo * units_per_row + t;
  const U4* a_hi = a_lo + 8 * units_per_row;
  const u64* m_lo = meta + row_lo * words_per_row;
  const u64* m_hi = m_lo + 8 * words_per_row;

  const int* ids = sorted_ids + blk * 16;
  const int id0 = ids[g], id1 = ids[8 + g];
  // a padding slot reads row 0: its products land in columns that are never stored
  const U4* b0 = act + (long long)(id0 < n_pairs ? id0 / rows_per_a : 0) * act_units + t;
  const U4* b1 = act + (long long)(id1 < n_pairs ? id1 / rows_per_a : 0) * act_units + t;
  const bool two = ids[8] < n_pairs;  // a block's real pairs come first

  float acc0[4] = {0.f, 0.f, 0.f, 0.f}, acc1[4] = {0.f, 0.f, 0.f, 0.f};
  const int quad = lane & ~3;
  for (int c = c_begin; c < c_end; c += UNROLL) {
    U4 lo[UNROLL], hi[UNROLL];
    // lane t of each quad loads the metadata words of steps c + t + 4j (rows g and g + 8), so a
    // quad reads whole 32-byte sectors; the step's owner lane hands its word round by a shuffle
    constexpr int WORDS = (UNROLL + 3) / 4;
    u64 mw_lo[WORDS], mw_hi[WORDS];
#pragma unroll
    for (int j = 0; j < WORDS; ++j) {
      mw_lo[j] = 0;
      mw_hi[j] = 0;
      if (t + 4 * j < UNROLL && c + t + 4 * j < c_end) {
        mw_lo[j] = load_meta(m_lo + c + t + 4 * j);
        mw_hi[j] = load_meta(m_hi + c + t + 4 * j);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (c + u < c_end) {
        lo[u] = load_stream(a_lo + (long long)(c + u) * 4);
        hi[u] = load_stream(a_hi + (long long)(c + u) * 4);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const u64 wl = __shfl_sync(0xffffffffu, mw_lo[u >> 2], quad | (u & 3));
      const u64 wh = __shfl_sync(0xffffffffu, mw_hi[u >> 2], quad | (u & 3));
      if (c + u < c_end) {
        const long long off = (long long)(c + u) * 8;
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          const u32 meta_e = meta_bits(wl, 2 * m + t) | (meta_bits(wh, 2 * m + t) << 16);
          const u32 x0 = m ? lo[u].z : lo[u].x, x1 = m ? hi[u].z : hi[u].x;
          const u32 x2 = m ? lo[u].w : lo[u].y, x3 = m ? hi[u].w : hi[u].y;
          const U4 bx0 = load_cached(b0 + off + m * 4);
          mma_sp(acc0, x0, x1, x2, x3, bx0, meta_e);
          if (two) {
            const U4 bx1 = load_cached(b1 + off + m * 4);
            mma_sp(acc1, x0, x1, x2, x3, bx1, meta_e);
          }
        }
      }
    }
  }

  // d0, d1: row g, tokens 2t, 2t + 1 of the tile; d2, d3: row g + 8
#pragma unroll
  for (int tile = 0; tile < 2; ++tile) {
    const float* acc = tile ? acc1 : acc0;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int pair = ids[tile * 8 + 2 * t + i];
      if (pair >= n_pairs) continue;
      const long long base = (long long)pair * N + row0 + g;
      if (partial) {
        float* o = (float*)out + (long long)blockIdx.z * n_pairs * N + base;
        o[0] = acc[i];
        o[8] = acc[2 + i];
      } else {
        unsigned short* o = (unsigned short*)out + base;
        o[0] = to_bf16(acc[i]);
        o[8] = to_bf16(acc[2 + i]);
      }
    }
  }
}
