// Prefill on Hopper's sparse warpgroup instruction (wgmma.mma_async.sp, sm_90a), appended to cuda_mma.cu
// (whose helpers it uses) when compiled for compute capability 9.0 (stun_lightning/sparse/cuda_mma.py).
// Two kernels: sparse24_wgmma_tile (every warp copies and multiplies; serves 128-row tiles) and
// sparse24_wgmma_ws (warp-specialized, further down; the default where the outputs divide by 256).
//
// As sparse24_mma_tile: one block of 128 (token, expert) pairs of one expert (align_pairs, block_m =
// 128) by 64 * WG weight rows per CTA, and each step of 64 inputs brings the compressed values, the
// metadata words and the 128 gathered activation rows into shared memory with cp.async, STAGES deep.
// Here WG warpgroups each own 64 weight rows x all 128 pairs: per 32 inputs one
// wgmma.mma_async.sp.m64n128k32 with the weight fragment in registers (ldmatrix, the same fragment
// as mma.sp's per warp of 16 rows) and the activations read by the tensor cores from shared memory
// through a matrix descriptor. The activation tile is K-major with the 128-byte swizzle (16-byte
// chunk c of row p at p * 128 + ((c ^ (p % 8)) * 16), 1024-byte aligned), the layout the descriptor
// names; the second 32 inputs of a step start 64 bytes into it. Each warpgroup waits for its wgmma
// before the next step (ptxas serializes a sparse wgmma whose metadata or fragment registers are
// written while an earlier one is in flight), so the overlap comes from other warpgroups and CTAs.

#define WG_PAIRS 128

// The dynamic shared memory from its first 1 KiB boundary (the launches ask for 1 KiB more, so that
// the swizzled activation tiles are 1024-byte aligned): its shared-space address, and in `bytes` the
// same place as a pointer.
__device__ __forceinline__ u32 smem_1k_aligned(U4* smem_u4, const unsigned char*& bytes) {
  const u32 raw = (u32)__cvta_generic_to_shared(smem_u4);
  const u32 smem = (raw + 1023u) & ~1023u;
  bytes = (const unsigned char*)smem_u4 + (smem - raw);
  return smem;
}

// A stage of the wgmma kernels: the activation tile first (1024-byte aligned: stages are padded to
// 1 KiB), then the values, then the metadata words of TILE_ROWS weight rows.
template <int TILE_ROWS>
struct WgmmaStage {
  static constexpr int B_BYTES = WG_PAIRS * 128, A_BYTES = TILE_ROWS * 64, E_BYTES = TILE_ROWS * 8;
  static constexpr int BYTES = (B_BYTES + A_BYTES + E_BYTES + 1023) / 1024 * 1024;
};

// The CTA's block of pairs (its pair ids), expert (-1: an unused block) and first weight row.
// Launched as a grid of n_blocks x row tiles, the CTAs run GROUP consecutive blocks at a time over
// every row tile (GROUP = n_blocks: grid order), so that their activation rows can stay in L2
// while the weights stream past.
struct CtaTile {
  int expert, row_base;
  const int* ids;
};

__device__ __forceinline__ CtaTile cta_tile(int group, const int* block_expert, const int* sorted_ids, int tile_rows) {
  const int nb = gridDim.x, linear = blockIdx.y * nb + blockIdx.x;
  const int per_group = group * gridDim.y;
  const int first = (linear / per_group) * group, size = nb - first < group ? nb - first : group;
  const int r = linear % per_group;
  const int blk = first + r % size, tile = r / size;
  return CtaTile{block_expert[blk], tile * tile_rows, sorted_ids + blk * WG_PAIRS};
}

__device__ __forceinline__ u64 sw128_desc(u32 addr) {
  // start address / 16 (bits 0-13), leading offset 1 (unused: K-major, the 32 inputs of one
  // instruction lie inside a swizzle row), stride offset 1024 / 16 between groups of 8 rows
  // (bits 32-45), swizzle mode 1 = 128 bytes (bits 62-63)
  return (u64)((addr & 0x3FFFFu) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

__device__ __forceinline__ void keep_in_registers(float* d) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d (64 rows x 128 pairs, f32) += A (64 x 32 inputs, 2:4: a0..a3 and metadata e) * B (smem, desc)
__device__ __forceinline__ void wgmma_sp_n128(float* d, const u32* a, u64 desc, u32 e) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %71, 0;\n"
      "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63},"
      " {%64, %65, %66, %67}, %68, %69, %70, p, %72, %73, %74;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(e), "n"(0), "r"(1), "n"(1), "n"(1), "n"(0));
}

// A warp's 16 output rows (from `row`) x the block's 128 pairs: d[4j + 2h + q] is row g + 8h, pair
// 8j + 2t + q of the block (the wgmma accumulator layout); padding pairs are not stored.
__device__ __forceinline__ void store_rows(unsigned short* out, const int* ids, int n_pairs, int N, int row, const float* d, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < WG_PAIRS / 8; ++j) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int pair = ids[8 * j + 2 * t + q];
      if (pair >= n_pairs) continue;
      unsigned short* o = out + (long long)pair * N + row + g;
      o[0] = to_bf16(d[4 * j + q]);
      o[8] = to_bf16(d[4 * j + 2 + q]);
    }
  }
}

template <int WG, int STAGES, int CTAS>
__global__ void __launch_bounds__(128 * WG, CTAS) sparse24_wgmma_tile(
    const unsigned short* __restrict__ values,  // [E, N, K/2] bf16
    const u64* __restrict__ meta,               // [E, N, K/8] bytes: K/64 words per row
    const unsigned short* __restrict__ act,     // [M, K] bf16, rows in input order
    const int* __restrict__ sorted_ids,         // [n_blocks * 128]
    const int* __restrict__ block_expert,
    unsigned short* __restrict__ out,           // [n_pairs, N] bf16
    int N, int K, int n_pairs, int rows_per_a, int group) {
  constexpr int THREADS = 128 * WG, TILE_ROWS = 64 * WG;
  using Stage = WgmmaStage<TILE_ROWS>;
  constexpr int B_BYTES = Stage::B_BYTES, A_BYTES = Stage::A_BYTES, STAGE_BYTES = Stage::BYTES;
  extern __shared__ U4 smem_u4[];
  const CtaTile cta = cta_tile(group, block_expert, sorted_ids, TILE_ROWS);
  if (cta.expert < 0) return;
  const int e = cta.expert, row_base = cta.row_base;
  const int* ids = cta.ids;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int steps = K >> 6;
  const unsigned char* smem_bytes;
  const u32 smem = smem_1k_aligned(smem_u4, smem_bytes);

  StepCopies<THREADS, TILE_ROWS> copies(values, meta, act, ids, e, N, K, row_base, n_pairs, rows_per_a, tid, B_BYTES, 0, B_BYTES + A_BYTES);
  auto load_step = [&](int step, int stage) { copies.issue(smem + stage * STAGE_BYTES, step); };

  float d[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) d[i] = 0.f;
  keep_in_registers(d);

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < steps) load_step(s, s);
    asm volatile("cp.async.commit_group;");
  }
  const int rows = (warp >> 2) * 64 + (warp & 3) * 16;  // this warp's 16 rows of the tile
  for (int step = 0; step < steps; ++step) {
    asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 2));
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // cp.async wrote it; wgmma reads it
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");  // the stage refilled below is free
    keep_in_registers(d);
    __syncthreads();
    const int next = step + STAGES - 1;
    if (next < steps) load_step(next, next % STAGES);
    asm volatile("cp.async.commit_group;");
    const int stage = step % STAGES;
    const u32 base = smem + stage * STAGE_BYTES;
    const u64* words = (const u64*)(smem_bytes + stage * STAGE_BYTES + B_BYTES + A_BYTES);
    u32 fa[2][4], fe[2];
#pragma unroll
    for (int s = 0; s < 2; ++s) fe[s] = sparse_fragment(base + B_BYTES, words, rows, lane, s, fa[s]);
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int s = 0; s < 2; ++s) wgmma_sp_n128(d, fa[s], sw128_desc(base + s * 64), fe[s]);
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    keep_in_registers(d);
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  keep_in_registers(d);
  asm volatile("cp.async.wait_group 0;");

  store_rows(out, ids, n_pairs, N, row_base + rows, d, lane);
}

// ---- the same product, warp-specialized: producer warps fill the stages, warpgroups only multiply --
//
// sparse24_wgmma_tile waits for every warpgroup's wgmma and a CTA barrier at each step, so the
// tensor cores idle while all warps refill and reload together. Here PW producer warps copy each
// step's operands with cp.async and signal a "full" mbarrier per stage (cp.async.mbarrier.arrive:
// it fires when the thread's copies land); each of the CW consumer warpgroups waits for its stage,
// multiplies, and its warps arrive on the stage's "empty" mbarrier once their wgmma completed. No
// CTA-wide barrier after the start: the warpgroups drift apart, and one's fragment loads overlap
// another's wgmma. The shared-memory layout of a stage is sparse24_wgmma_tile's. With PW = 4 (a whole
// producer warpgroup) the producers hand registers to the consumers (setmaxnreg), so that each of
// CW = 2 consumer warpgroups holds MW = 2 x 64 rows of accumulators. A launch with 4 consumer
// warpgroups (112 registers each) did not finish on an H100 (not investigated): cuda_mma.py only
// launches CW = 2.

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}

__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void mbar_arrive_on_copies(u32 bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}

template <int CW, int MW, int STAGES, int PW>
__global__ void __launch_bounds__(128 * CW + 32 * PW, 1) sparse24_wgmma_ws(
    const unsigned short* __restrict__ values,  // [E, N, K/2] bf16
    const u64* __restrict__ meta,               // [E, N, K/8] bytes: K/64 words per row
    const unsigned short* __restrict__ act,     // [M, K] bf16, rows in input order
    const int* __restrict__ sorted_ids,         // [n_blocks * 128]
    const int* __restrict__ block_expert,
    unsigned short* __restrict__ out,           // [n_pairs, N] bf16
    int N, int K, int n_pairs, int rows_per_a, int group) {
  // CW consumer warpgroups of MW x 64 rows each, PW producer warps
  constexpr int TILE_ROWS = 64 * CW * MW, PT = 32 * PW;
  using Stage = WgmmaStage<TILE_ROWS>;
  constexpr int B_BYTES = Stage::B_BYTES, A_BYTES = Stage::A_BYTES, STAGE_BYTES = Stage::BYTES;
  static_assert((TILE_ROWS * 4) % PT == 0 && (WG_PAIRS * 8) % PT == 0, "producer threads must divide the copies");
  extern __shared__ U4 smem_u4[];
  const CtaTile cta = cta_tile(group, block_expert, sorted_ids, TILE_ROWS);
  if (cta.expert < 0) return;
  const int e = cta.expert, row_base = cta.row_base;
  const int* ids = cta.ids;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int steps = K >> 6;
  const unsigned char* smem_bytes;
  const u32 smem = smem_1k_aligned(smem_u4, smem_bytes);
  const u32 full = smem + STAGES * STAGE_BYTES, empty = full + 8 * STAGES;
  int* act_row = (int*)(smem_bytes + STAGES * STAGE_BYTES + 16 * STAGES);  // activation row of each pair
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full + 8 * s, PT);
      mbar_init(empty + 8 * s, 4 * CW);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if (tid < WG_PAIRS) {
    const int id = ids[tid];
    act_row[tid] = id < n_pairs ? id / rows_per_a : 0;  // a padding slot reads row 0, never stored
  }
  __syncthreads();

  // registers per thread after setmaxnreg: a whole producer warpgroup hands registers to the consumers
  constexpr int PRODUCER_REGS = 40, CONSUMER_REGS = CW == 2 ? 232 : 112;
  if (warp >= 4 * CW) {  // producer
    if (PW == 4) asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(PRODUCER_REGS));
    const int p_tid = tid - 128 * CW;
    constexpr int A_PER = TILE_ROWS * 4 / PT, B_PER = WG_PAIRS * 8 / PT, E_PER = (TILE_ROWS + PT - 1) / PT;
    const int ac = p_tid & 3, bc = p_tid & 7;
    // the gathered activation rows do not change along K: their offsets once, not an act_row load and
    // a 64-bit multiply per copy per step (Nsight Compute: the consumers waited on the producer for a
    // third of their time, and its address arithmetic stalled on those loads). 32-bit: the launch
    // takes activations of fewer than 2^31 elements (cuda_mma.MAX_ACT_ELEMENTS)
    int b_off[B_PER];
#pragma unroll
    for (int j = 0; j < B_PER; ++j) b_off[j] = act_row[(p_tid >> 3) + (PT / 8) * j] * K + bc * 8;
    const unsigned short* a_src = values + ((long long)e * N + row_base + (p_tid >> 2)) * (K >> 1) + ac * 8;
    const long long a_stride = (long long)(PT / 4) * (K >> 1);
    const u64* e_src = meta + ((long long)e * N + row_base) * (K >> 6);
    for (int step = 0; step < steps; ++step) {
      const int stage = step % STAGES;
      if (step >= STAGES) mbar_wait(empty + 8 * stage, ((step / STAGES) - 1) & 1);
      const u32 base = smem + stage * STAGE_BYTES;
#pragma unroll
      for (int j = 0; j < A_PER; ++j) {
        const int r = (p_tid >> 2) + (PT / 4) * j;
        cp_async16(base + B_BYTES + r * 64 + ((ac ^ ((r >> 1) & 3)) << 4), a_src + j * a_stride + step * 32);
      }
#pragma unroll
      for (int j = 0; j < B_PER; ++j) {
        const int p = (p_tid >> 3) + (PT / 8) * j;
        cp_async16(base + p * 128 + ((bc ^ (p & 7)) << 4), act + step * 64 + b_off[j]);
      }
#pragma unroll
      for (int j = 0; j < E_PER; ++j) {
        const int r = p_tid + PT * j;
        if (r < TILE_ROWS) cp_async8(base + B_BYTES + A_BYTES + r * 8, e_src + (long long)r * (K >> 6) + step);
      }
      mbar_arrive_on_copies(full + 8 * stage);
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    return;
  }

  // consumer warpgroups
  if (PW == 4) asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(CONSUMER_REGS));
  const int rows = (warp >> 2) * 64 * MW + (warp & 3) * 16;  // this warp's first 16 rows of the tile
  float d[MW][64];
#pragma unroll
  for (int m = 0; m < MW; ++m)
#pragma unroll
    for (int i = 0; i < 64; ++i) d[m][i] = 0.f;
  for (int step = 0; step < steps; ++step) {
    const int stage = step % STAGES;
    mbar_wait(full + 8 * stage, (step / STAGES) & 1);
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // cp.async wrote it; wgmma reads it
    const u32 base = smem + stage * STAGE_BYTES;
    const u64* words = (const u64*)(smem_bytes + stage * STAGE_BYTES + B_BYTES + A_BYTES);
    u32 fa[MW][2][4], fe[MW][2];
#pragma unroll
    for (int m = 0; m < MW; ++m)
#pragma unroll
      for (int s = 0; s < 2; ++s) fe[m][s] = sparse_fragment(base + B_BYTES, words, rows + 64 * m, lane, s, fa[m][s]);
#pragma unroll
    for (int m = 0; m < MW; ++m) keep_in_registers(d[m]);
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
      for (int m = 0; m < MW; ++m) wgmma_sp_n128(d[m], fa[m][s], sw128_desc(base + s * 64), fe[m][s]);
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
#pragma unroll
    for (int m = 0; m < MW; ++m) keep_in_registers(d[m]);
    __syncwarp();
    if (lane == 0) mbar_arrive(empty + 8 * stage);
  }

#pragma unroll
  for (int m = 0; m < MW; ++m) store_rows(out, ids, n_pairs, N, row_base + rows + 64 * m, d[m], lane);
}
