// ---- sparse24_wgmma_ws<2, 2, STAGES, 4> in clusters of two CTAs that share the weight tile ----------
//
// The warp-specialized kernel reads 34 KB per step of 64 inputs from L2 for a 256 x 128 tile (16 KB
// of values, 16 KB of gathered activation rows, 2 KB of metadata): about 4 TB/s at Mixtral's
// prefill, near what L2 delivers. Here two CTAs of a cluster take consecutive blocks of pairs for
// the same 256 weight rows; where both blocks belong to one expert (most of them when experts see
// several blocks, as Mixtral's at prefill) each CTA's producer loads half of the weight tile with
// the Tensor Memory Accelerator (one copy per step: a 32-input x 128-row box of the tensor map over
// the values, in the 64-byte swizzle that sparse_fragment reads), multicast into both CTAs' stages:
// 26 KB per CTA step. Otherwise each loads its whole tile alone (two copies). Activation rows and
// metadata come by cp.async as before. A stage's "full" barrier takes the producer's cp.async
// arrivals plus one arrival expecting the weight tile's bytes; "empty" takes the consumer warps of
// both CTAs when they share tiles, since both producers then write into it.
// (Multicasting the activation rows instead, one TMA copy per gathered row, ran 1.4x slower than
// the kernel without clusters: benchmarks/results/sparse_kernels_h100.md, run 11.)

struct __align__(64) TensorMap {
  u64 words[16];
};

__device__ __forceinline__ u32 cluster_rank() {
  u32 rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  return rank;
}

__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive_expect_bytes(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

// arrive on the mbarrier at the same shared-memory offset in CTA `rank` of the cluster
__device__ __forceinline__ void mbar_arrive_in(u32 bar, u32 rank) {
  asm volatile(
      "{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.release.cluster.shared::cluster.b64 _, [remote];\n}\n" ::"r"(bar), "r"(rank) : "memory");
}

// the box of the tensor map at (col, row) into `dst`, completing its bytes on `bar`
__device__ __forceinline__ void tma_box(u32 dst, const TensorMap* map, int col, int row, u32 bar) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
               ::"r"(dst), "l"((u64)map), "r"(col), "r"(row), "r"(bar) : "memory");
}

// ... into `dst` of both CTAs of the cluster, completing its bytes on `bar` of each
__device__ __forceinline__ void tma_box_to_both(u32 dst, const TensorMap* map, int col, int row, u32 bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%2, %3}], [%4], %5;"
      ::"r"(dst), "l"((u64)map), "r"(col), "r"(row), "r"(bar), "h"((unsigned short)3) : "memory");
}

template <int STAGES>
__global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(384, 1) sparse24_wgmma_mc(
    const __grid_constant__ TensorMap values_map,  // values as [E * N, K/2] bf16, boxes of 32 inputs x 128 rows
    const u64* __restrict__ meta,                  // [E, N, K/8] bytes: K/64 words per row
    const unsigned short* __restrict__ act,        // [M, K] bf16, rows in input order
    const int* __restrict__ sorted_ids,            // [n_blocks * 128]
    const int* __restrict__ block_expert,
    unsigned short* __restrict__ out,              // [n_pairs, N] bf16
    int N, int K, int n_pairs, int rows_per_a, int n_blocks) {  // the grid's x is n_blocks rounded up to even
  constexpr int CW = 2, MW = 2, TILE_ROWS = 256, PT = 128;
  using Stage = WgmmaStage<TILE_ROWS>;
  constexpr int B_BYTES = Stage::B_BYTES, A_BYTES = Stage::A_BYTES, STAGE_BYTES = Stage::BYTES;
  static_assert(A_BYTES == 2 * 128 * 64, "two boxes of 128 rows x 64 bytes");
  extern __shared__ U4 smem_u4[];
  const int blk = blockIdx.x, row_base = blockIdx.y * TILE_ROWS;
  const int e = blk < n_blocks ? block_expert[blk] : -1;
  const int e_peer = (blk ^ 1) < n_blocks ? block_expert[blk ^ 1] : -1;
  const bool paired = e >= 0 && e == e_peer;  // the same in both CTAs of the cluster
  const int* ids = sorted_ids + (long long)blk * WG_PAIRS;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int steps = K >> 6;
  const u32 rank = cluster_rank();
  const unsigned char* smem_bytes;
  const u32 smem = smem_1k_aligned(smem_u4, smem_bytes);
  const u32 full = smem + STAGES * STAGE_BYTES, empty = full + 8 * STAGES;
  int* act_row = (int*)(smem_bytes + STAGES * STAGE_BYTES + 16 * STAGES);
  if (e >= 0 && tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full + 8 * s, PT + 1);
      mbar_init(empty + 8 * s, (paired ? 2 : 1) * 4 * CW);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if (e >= 0 && tid < WG_PAIRS) {
    const int id = ids[tid];
    act_row[tid] = id < n_pairs ? id / rows_per_a : 0;  // a padding slot reads row 0, never stored
  }
  cluster_sync();  // both CTAs' barriers exist before any multicast or remote arrival

  if (e >= 0 && warp >= 4 * CW) {  // producer warpgroup
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    const int p_tid = tid - 128 * CW;
    constexpr int B_PER = WG_PAIRS * 8 / PT, E_PER = TILE_ROWS / PT;
    const int bc = p_tid & 7;
    const u64* e_src = meta + ((long long)e * N + row_base) * (K >> 6);
    const int weight_row = e * N + row_base;
    for (int step = 0; step < steps; ++step) {
      const int stage = step % STAGES;
      if (step >= STAGES) mbar_wait(empty + 8 * stage, ((step / STAGES) - 1) & 1);
      const u32 base = smem + stage * STAGE_BYTES;
      if (p_tid == 0) {
        mbar_arrive_expect_bytes(full + 8 * stage, A_BYTES);
        if (paired) {
          tma_box_to_both(base + B_BYTES + rank * (A_BYTES / 2), &values_map, step * 32, weight_row + 128 * rank, full + 8 * stage);
        } else {
          tma_box(base + B_BYTES, &values_map, step * 32, weight_row, full + 8 * stage);
          tma_box(base + B_BYTES + A_BYTES / 2, &values_map, step * 32, weight_row + 128, full + 8 * stage);
        }
      }
#pragma unroll
      for (int j = 0; j < B_PER; ++j) {
        const int p = (p_tid >> 3) + (PT / 8) * j;
        cp_async16(base + p * 128 + ((bc ^ (p & 7)) << 4), act + (long long)act_row[p] * K + bc * 8 + step * 64);
      }
#pragma unroll
      for (int j = 0; j < E_PER; ++j) {
        const int r = p_tid + PT * j;
        cp_async8(base + B_BYTES + A_BYTES + r * 8, e_src + (long long)r * (K >> 6) + step);
      }
      mbar_arrive_on_copies(full + 8 * stage);
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
  } else if (e >= 0) {  // consumer warpgroups
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
    const int rows = (warp >> 2) * 64 * MW + (warp & 3) * 16;
    float d[MW][64];
#pragma unroll
    for (int m = 0; m < MW; ++m)
#pragma unroll
      for (int i = 0; i < 64; ++i) d[m][i] = 0.f;
    for (int step = 0; step < steps; ++step) {
      const int stage = step % STAGES;
      mbar_wait(full + 8 * stage, (step / STAGES) & 1);
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // cp.async wrote the activations; wgmma reads them
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
      if (lane == 0) {
        mbar_arrive(empty + 8 * stage);
        if (paired) mbar_arrive_in(empty + 8 * stage, rank ^ 1);
      }
    }
#pragma unroll
    for (int m = 0; m < MW; ++m) store_rows(out, ids, n_pairs, N, row_base + rows + 64 * m, d[m], lane);
  }
  cluster_sync();  // neither CTA leaves while the other may still write into it or arrive on its barriers
}
