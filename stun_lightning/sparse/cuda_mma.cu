// Routed tokens times 2:4-compressed bf16 expert weights on the sparse tensor cores (mma.sp, sm_80+).
//
// Compiled at run time by NVRTC (stun_lightning/sparse/cuda_mma.py); no CUDA headers needed. Two
// kernels: sparse24_mma for decode (below) and sparse24_mma_tile for prefill (further down).
//
// Decode: one block of 16 (token, expert) pairs of one expert (align_pairs, block_m = 16) by WARPS * 16
// output rows per CTA; each warp owns 16 weight rows and runs mma.sp.m16n8k32 with the weight as
// the sparse A operand (rows = M) and the block's tokens as B (two n8 tiles). The kernel reads the
// compressed values and metadata in our own layout (format.py) with no reordering of the weights:
// per step of 64 inputs, lane (g, t) loads 16 contiguous bytes (groups 4t..4t+3) of rows g and
// g + 8, and the step's two mma instructions take groups {4t + 2m, 4t + 2m + 1} as their groups
// {t, t + 4}. The activations are permuted once per call to match (permute_activations in cuda_mma.py), so
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

// ---- prefill: a (64 * WR)-row x 128-pair tile per CTA, operands staged in shared memory ----------
//
// One block of 128 pairs of one expert (align_pairs, block_m = 128) by 64 * WR weight rows; WR x 2
// warps, each 64 rows x 64 pairs (4 x 8 mma.sp per 32 inputs). Each step of 64 inputs brings the
// compressed values (rows x 32), the metadata words (rows x 8 bytes) and the 128 gathered activation
// rows (128 x 64, not permuted) into shared memory with cp.async, STAGES deep; ldmatrix hands
// out the fragments, so the mma's groups are our groups in order and each lane's metadata is 16
// contiguous bits of a row's word. 16-byte chunks are XOR-swizzled by row against bank conflicts.

#define TILE_PAIRS 128
#define TILE_B_BYTES (TILE_PAIRS * 128)

__device__ __forceinline__ void cp_async16(u32 dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
}

__device__ __forceinline__ void cp_async8(u32 dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(dst), "l"(src));
}

__device__ __forceinline__ void ldmatrix4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

// The sparse operand of one 16-row x 32-input mma from a staged step: ldmatrix fragment (rows of 64
// bytes, chunk c of row r at r * 64 + ((c ^ ((r / 2) % 4)) * 16) from `tile`) into fa, and the
// lane's 32 metadata bits (16 of rows g and g + 8 each, from the rows' 8-byte words) returned.
// `s`: which 32 inputs of the step; also the wgmma kernels' fragment (cuda_wgmma.cu), per warp.
__device__ __forceinline__ u32 sparse_fragment(u32 tile, const u64* words, int row16, int lane, int s, u32 (&fa)[4]) {
  const int mi = lane >> 3, rr = lane & 7, g = lane >> 2, t = lane & 3;
  const int r = row16 + (mi & 1) * 8 + rr, c = 2 * s + (mi >> 1);
  ldmatrix4(tile + r * 64 + ((c ^ ((r >> 1) & 3)) << 4), fa[0], fa[1], fa[2], fa[3]);
  const int shift = 32 * s + 16 * (t & 1);
  return (u32)((words[row16 + g] >> shift) & 0xFFFFull) | ((u32)((words[row16 + g + 8] >> shift) & 0xFFFFull) << 16);
}

// What thread `tid` of THREADS copies into a stage per step of 64 inputs, for a tile of ROWS weight
// rows x TILE_PAIRS pairs: 16-byte chunks of the rows' compressed values (chunk c of row r at
// a_off + r * 64 + ((c ^ ((r / 2) % 4)) * 16), as sparse_fragment reads them), of the pairs'
// gathered activation rows (chunk c of pair p at b_off + p * 128 + ((c ^ (p % 8)) * 16)) and, for
// tid < ROWS, row tid's 8-byte metadata word (at e_off + tid * 8).
template <int THREADS, int ROWS>
struct StepCopies {
  static constexpr int A_CHUNKS = ROWS * 4 / THREADS, B_CHUNKS = TILE_PAIRS * 8 / THREADS;
  const unsigned short* a_src[A_CHUNKS];
  u32 a_dst[A_CHUNKS];
  const unsigned short* b_src[B_CHUNKS];
  u32 b_dst[B_CHUNKS];
  const u64* e_src;
  u32 e_dst;
  bool copies_meta;

  __device__ __forceinline__ StepCopies(const unsigned short* values, const u64* meta, const unsigned short* act, const int* ids, int e,
                                        int N, int K, int row_base, int n_pairs, int rows_per_a, int tid, u32 a_off, u32 b_off, u32 e_off) {
#pragma unroll
    for (int i = 0; i < A_CHUNKS; ++i) {
      const int r = (tid >> 2) + (THREADS / 4) * i, c = tid & 3;
      a_src[i] = values + ((long long)e * N + row_base + r) * (K >> 1) + c * 8;
      a_dst[i] = a_off + r * 64 + ((c ^ ((r >> 1) & 3)) << 4);
    }
#pragma unroll
    for (int i = 0; i < B_CHUNKS; ++i) {
      const int p = (tid >> 3) + (THREADS / 8) * i, c = tid & 7;
      const int id = ids[p];
      // a padding slot reads row 0: its products land in columns that are never stored
      b_src[i] = act + (long long)(id < n_pairs ? id / rows_per_a : 0) * K + c * 8;
      b_dst[i] = b_off + p * 128 + ((c ^ (p & 7)) << 4);
    }
    copies_meta = THREADS <= ROWS || tid < ROWS;
    e_src = meta + ((long long)e * N + row_base + (copies_meta ? tid : 0)) * (K >> 6);
    e_dst = e_off + tid * 8;
  }

  __device__ __forceinline__ void issue(u32 base, int step) const {
#pragma unroll
    for (int i = 0; i < A_CHUNKS; ++i) cp_async16(base + a_dst[i], a_src[i] + step * 32);
#pragma unroll
    for (int i = 0; i < B_CHUNKS; ++i) cp_async16(base + b_dst[i], b_src[i] + step * 64);
    if (copies_meta) cp_async8(base + e_dst, e_src + step);
  }
};

// WR warps along the weight rows (tile of 64 * WR rows) by 2 along the pairs; STAGES steps in flight
template <int WR, int STAGES>
__global__ void __launch_bounds__(64 * WR) sparse24_mma_tile(
    const unsigned short* __restrict__ values,  // [E, N, K/2] bf16
    const u64* __restrict__ meta,               // [E, N, K/8] bytes: K/64 words per row
    const unsigned short* __restrict__ act,     // [M, K] bf16, rows in input order
    const int* __restrict__ sorted_ids,         // [n_blocks * 128]
    const int* __restrict__ block_expert,
    unsigned short* __restrict__ out,           // [n_pairs, N] bf16
    int N, int K, int n_pairs, int rows_per_a) {
  constexpr int THREADS = 64 * WR, TILE_ROWS = 64 * WR;
  constexpr int TILE_A_BYTES = TILE_ROWS * 64, TILE_E_BYTES = TILE_ROWS * 8;
  constexpr int TILE_STAGE_BYTES = TILE_A_BYTES + TILE_B_BYTES + TILE_E_BYTES;
  extern __shared__ U4 smem_u4[];
  const int blk = blockIdx.x;
  const int e = block_expert[blk];
  if (e < 0) return;
  const int row_base = blockIdx.y * TILE_ROWS;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int wr = warp >> 1, wp = warp & 1;
  const int steps = K >> 6;
  const int* ids = sorted_ids + blk * TILE_PAIRS;
  const u32 smem = (u32)__cvta_generic_to_shared(smem_u4);

  StepCopies<THREADS, TILE_ROWS> copies(values, meta, act, ids, e, N, K, row_base, n_pairs, rows_per_a, tid, 0, TILE_A_BYTES,
                                         TILE_A_BYTES + TILE_B_BYTES);
  auto load_step = [&](int step, int stage) { copies.issue(smem + stage * TILE_STAGE_BYTES, step); };

  float acc[4][8][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < steps) load_step(s, s);
    asm volatile("cp.async.commit_group;");
  }
  const int mi = lane >> 3, rr = lane & 7;  // which 8x8 matrix this lane addresses, and its row
  for (int step = 0; step < steps; ++step) {
    asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 2));
    __syncthreads();
    const int next = step + STAGES - 1;
    if (next < steps) load_step(next, next % STAGES);
    asm volatile("cp.async.commit_group;");
    const u32 base = smem + (step % STAGES) * TILE_STAGE_BYTES;
    const u64* words = (const u64*)((const unsigned char*)smem_u4 + (step % STAGES) * TILE_STAGE_BYTES + TILE_A_BYTES + TILE_B_BYTES);
#pragma unroll
    for (int s = 0; s < 2; ++s) {  // 32 inputs each
      u32 fa[4][4], fe[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) fe[i] = sparse_fragment(base, words, wr * 64 + i * 16, lane, s, fa[i]);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int p = wp * 64 + j * 8 + rr, c = 4 * s + mi;
        U4 fb;
        ldmatrix4(base + TILE_A_BYTES + p * 128 + ((c ^ (p & 7)) << 4), fb.x, fb.y, fb.z, fb.w);
#pragma unroll
        for (int i = 0; i < 4; ++i) mma_sp(acc[i][j], fa[i][0], fa[i][1], fa[i][2], fa[i][3], fb, fe[i]);
      }
    }
  }
  asm volatile("cp.async.wait_group 0;");

#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int pair = ids[wp * 64 + j * 8 + 2 * t + q];
      if (pair >= n_pairs) continue;
      unsigned short* o = out + (long long)pair * N + row_base + wr * 64 + g;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        o[i * 16] = to_bf16(acc[i][j][q]);
        o[i * 16 + 8] = to_bf16(acc[i][j][2 + q]);
      }
    }
  }
}
