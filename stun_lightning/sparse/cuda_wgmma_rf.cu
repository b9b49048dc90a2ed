// ---- sparse24_wgmma_rf: the warp-specialized kernel with the weights fed to registers from global memory --
//
// In sparse24_wgmma_ws every step passes through shared memory five times over: cp.async writes
// the values, metadata and activation rows (34 KB per 256 x 128 tile), ldmatrix reads the values
// back (16 KB), and each of the 2 x 2 wgmma per warpgroup reads the activation tile (64 KB). Nsight
// Compute put the L1/shared-memory datapath at 74% of its peak and the tensor pipe at 31% on
// Mixtral's gate_up (benchmarks/kernel_counters.py): the sparse instruction does twice the math per
// activation byte it reads, so shared-memory bandwidth, not the tensor cores, bounds it. Here each
// consumer thread loads its weight fragments and metadata words straight from global memory into
// registers (as the decode kernel sparse24_mma does: 16 contiguous bytes per row per step, the
// fragment order taken up by permuting the activations' inputs within each step of 64, see
// cuda_mma.permute_activations_wgmma), two steps ahead; shared memory holds only the activation
// tiles (16 KB per stage), which the producer warpgroup gathers with cp.async as before.

// one step's weight fragments of a warp's MW x 16 rows: rows g and g + 8 (lo / hi) of each 16
template <int MW>
struct RowFragments {
  U4 lo[MW], hi[MW];
  u64 wlo[MW], whi[MW];

  __device__ __forceinline__ void load(const U4* a, const u64* w, long long units, long long words, int step) {
#pragma unroll
    for (int m = 0; m < MW; ++m) {
      lo[m] = load_stream(a + 64 * m * units + step * 4);
      hi[m] = load_stream(a + (64 * m + 8) * units + step * 4);
      wlo[m] = load_meta(w + 64 * m * words + step);
      whi[m] = load_meta(w + (64 * m + 8) * words + step);
    }
  }
};

// d[m] += the warpgroup's m-th 64 rows x the stage's 128 pairs, for both halves of the step
// (every operand is computed before the fence, so that ptxas need not fence each wgmma on its own)
template <int MW>
__device__ __forceinline__ void multiply_step(float (&d)[MW][64], const RowFragments<MW>& f, u32 stage, int t) {
  u32 a[2][MW][4], e[2][MW];
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int m = 0; m < MW; ++m) {
      a[s][m][0] = s ? f.lo[m].z : f.lo[m].x;
      a[s][m][1] = s ? f.hi[m].z : f.hi[m].x;
      a[s][m][2] = s ? f.lo[m].w : f.lo[m].y;
      a[s][m][3] = s ? f.hi[m].w : f.hi[m].y;
      e[s][m] = meta_bits(f.wlo[m], 2 * s + t) | (meta_bits(f.whi[m], 2 * s + t) << 16);
    }
#pragma unroll
  for (int m = 0; m < MW; ++m) keep_in_registers(d[m]);
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int m = 0; m < MW; ++m) wgmma_sp_n128(d[m], a[s][m], sw128_desc(stage + s * 64), e[s][m]);
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
#pragma unroll
  for (int m = 0; m < MW; ++m) keep_in_registers(d[m]);
}

template <int MW, int STAGES>
__global__ void __launch_bounds__(384, 1) sparse24_wgmma_rf(
    const U4* __restrict__ values,              // [E, N, K/2] bf16: K/16 16-byte units per row
    const u64* __restrict__ meta,               // [E, N, K/8] bytes: K/64 words per row
    const unsigned short* __restrict__ act,     // [M, K] bf16, inputs permuted per 64 (permute_activations_wgmma)
    const int* __restrict__ sorted_ids,         // [n_blocks * 128]
    const int* __restrict__ block_expert,
    unsigned short* __restrict__ out,           // [n_pairs, N] bf16
    int N, int K, int n_pairs, int rows_per_a, int group) {
  constexpr int CW = 2, PT = 128, TILE_ROWS = 64 * CW * MW, STAGE_BYTES = WG_PAIRS * 128;
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
  int* act_row = (int*)(smem_bytes + STAGES * STAGE_BYTES + 16 * STAGES);
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

  if (warp >= 4 * CW) {  // producer warpgroup: the activation tiles only
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    const int p_tid = tid - 128 * CW, bc = p_tid & 7;
    for (int step = 0; step < steps; ++step) {
      const int stage = step % STAGES;
      if (step >= STAGES) mbar_wait(empty + 8 * stage, ((step / STAGES) - 1) & 1);
#pragma unroll
      for (int j = 0; j < WG_PAIRS * 8 / PT; ++j) {
        const int p = (p_tid >> 3) + (PT / 8) * j;
        cp_async16(smem + stage * STAGE_BYTES + p * 128 + ((bc ^ (p & 7)) << 4), act + (long long)act_row[p] * K + bc * 8 + step * 64);
      }
      mbar_arrive_on_copies(full + 8 * stage);
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int g = lane >> 2, t = lane & 3;
  const int rows = (warp >> 2) * 64 * MW + (warp & 3) * 16;  // this warp's first row of the tile (m = 0)
  const long long units = K >> 4, words = K >> 6, row = (long long)e * N + row_base + rows + g;
  const U4* a_src = values + row * units + t;
  const u64* w_src = meta + row * words;
  float d[MW][64];
#pragma unroll
  for (int m = 0; m < MW; ++m)
#pragma unroll
    for (int i = 0; i < 64; ++i) d[m][i] = 0.f;
  RowFragments<MW> f0, f1;  // steps 2i and 2i + 1, loaded two steps ahead
  f0.load(a_src, w_src, units, words, 0);
  if (steps > 1) f1.load(a_src, w_src, units, words, 1);
  for (int step = 0; step < steps; step += 2) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int at = step + h;
      if (at >= steps) break;
      const int stage = at % STAGES;
      mbar_wait(full + 8 * stage, (at / STAGES) & 1);
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // cp.async wrote it; wgmma reads it
      RowFragments<MW>& f = h ? f1 : f0;
      multiply_step<MW>(d, f, smem + stage * STAGE_BYTES, t);
      __syncwarp();
      if (lane == 0) mbar_arrive(empty + 8 * stage);
      if (at + 2 < steps) f.load(a_src, w_src, units, words, at + 2);
    }
  }
#pragma unroll
  for (int m = 0; m < MW; ++m) store_rows(out, ids, n_pairs, N, row_base + rows + 64 * m, d[m], lane);
}
