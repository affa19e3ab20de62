// In-place paged compaction: per row, the kept slots beyond the new length move into the holes
// before it. Torch-free: raw pointers, element strides, a stream.
//
// The plan of a row (kept slots a_0 < a_1 < ... < a_{n-1}, then -1 padding):
//   n  = #kept                                   (the new length)
//   c  = #{m : a_m < n}                          (kept slots that stay put)
//   source of rank i   = a_{c+i},  0 <= i < n - c
//   hole   of rank i   = i + #{m < c : a_m - m <= i}
// a_m - m is the number of holes before a_m, non-decreasing in m, so the count is a binary
// search. Holes lie below n and sources at or above it: no slot is both read and written, so the
// moves are independent, need no scratch buffer and no ordering, and the fewest bytes move.
//
// Work split: grid (rows, y); each warp takes batches of 32 consecutive moves of its row. Lane l
// plans move (batch + l) - its source, its hole (one binary search per lane, in parallel) and their
// pages - then the warp copies the 32 moves one group at a time, K and V rows concatenated into one
// range of 16-byte (or narrower) chunks spread over the lanes, the loads of a group issued before
// its stores to keep several transactions in flight. n and c come from 32-ary warp searches (two
// or three rounds). Nothing reads `lengths`, so the write of the new length cannot race.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kvpress_kernels/common.cuh"

namespace kvpk {
namespace compaction {

// Slot of the hole of rank i (see the file comment); host and device share it.
template <class KeptAt>
KVPK_HD int hole_slot(int i, int staying, KeptAt kept_at) {
  return i + partition_point(staying, [&](int m) { return kept_at(m) - m <= i; });
}

#if defined(__CUDACC__)

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * 32;
constexpr int kMovesPerGroup = 2;  // moves whose loads are in flight together, per lane
// A copy kernel lives on memory parallelism: 3 blocks (24 warps) per SM, <= 80 registers, which
// holds 2 moves' loads in flight per lane without spilling (4 moves spill the 16-byte variant).
constexpr int kMinBlocksPerSm = 3;

struct Params {
  char* k;  // K pool, addressed in bytes
  int64_t k_stride_page, k_stride_slot;  // bytes
  char* v;
  int64_t v_stride_page, v_stride_slot;  // bytes
  char* pos;  // NULL when there is no position pool
  int64_t pos_stride_page, pos_stride_slot;  // bytes
  int32_t pos_bytes;
  int32_t k_chunks;  // K row bytes / sizeof(Vec)
  int32_t v_chunks;  // V row bytes / sizeof(Vec)
  int32_t page_size;
  IndexView2D table;
  IndexView1D lengths;
  IndexView2D kept;
  int32_t max_kept;
};

// Number of kept entries (the -1 padding follows them), computed by the whole warp.
__device__ __forceinline__ int warp_new_length(const IndexView1D& kept, int max_kept) {
  return warp_partition_point(max_kept, [&](int m) { return kept.load(m) >= 0; });
}

// c = #{m < n : a_m < n}: kept slots that stay where they are.
__device__ __forceinline__ int warp_staying(const IndexView1D& kept, int n) {
  return warp_partition_point(n, [&](int m) { return kept.load(m) < n; });
}

template <class Vec>
__device__ __forceinline__ void copy_group(const Params& p, int lane, int group_size, const int (&src_page)[kMovesPerGroup],
                                           const int (&src_off)[kMovesPerGroup], const int (&dst_page)[kMovesPerGroup],
                                           const int (&dst_off)[kMovesPerGroup]) {
  const int total = p.k_chunks + p.v_chunks;
  for (int q = lane; q < total; q += 32) {
    const bool is_v = q >= p.k_chunks;
    char* const base = is_v ? p.v : p.k;
    const int64_t stride_page = is_v ? p.v_stride_page : p.k_stride_page;
    const int64_t stride_slot = is_v ? p.v_stride_slot : p.k_stride_slot;
    const int64_t inner = static_cast<int64_t>(is_v ? q - p.k_chunks : q) * static_cast<int64_t>(sizeof(Vec));
    Vec buf[kMovesPerGroup];
#pragma unroll
    for (int u = 0; u < kMovesPerGroup; ++u) {
      if (u < group_size) {
        buf[u] = *reinterpret_cast<const Vec*>(base + src_page[u] * stride_page + src_off[u] * stride_slot + inner);
      }
    }
#pragma unroll
    for (int u = 0; u < kMovesPerGroup; ++u) {
      if (u < group_size) {
        *reinterpret_cast<Vec*>(base + dst_page[u] * stride_page + dst_off[u] * stride_slot + inner) = buf[u];
      }
    }
  }
}

template <class Vec>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) compact_paged_kernel(const Params p) {
  const int64_t row = blockIdx.x;
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int warp = static_cast<int>(threadIdx.x >> 5);
  const IndexView1D kept = p.kept.row(row);
  const IndexView1D table = p.table.row(row);

  const int n = warp_new_length(kept, p.max_kept);
  if (blockIdx.y == 0 && threadIdx.x == 0) p.lengths.store(row, n);
  const int staying = warp_staying(kept, n);
  const int64_t moves = n - staying;

  const int64_t batch_stride = static_cast<int64_t>(gridDim.y) * kWarpsPerBlock * 32;
  for (int64_t batch = (static_cast<int64_t>(blockIdx.y) * kWarpsPerBlock + warp) * 32; batch < moves;
       batch += batch_stride) {
    // Lane l plans move batch + l.
    const int i = static_cast<int>(batch) + lane;
    int my_src_page = 0, my_src_off = 0, my_dst_page = 0, my_dst_off = 0;
    if (i < moves) {
      const int src = static_cast<int>(kept.load(staying + i));
      const int dst = hole_slot(i, staying, [&](int m) { return static_cast<int>(kept.load(m)); });
      my_src_page = static_cast<int>(table.load(src / p.page_size));
      my_src_off = src % p.page_size;
      my_dst_page = static_cast<int>(table.load(dst / p.page_size));
      my_dst_off = dst % p.page_size;
      if (p.pos != nullptr) {  // one scalar per move: the planning lane moves it itself
        const char* from = p.pos + my_src_page * p.pos_stride_page + my_src_off * p.pos_stride_slot;
        char* to = p.pos + my_dst_page * p.pos_stride_page + my_dst_off * p.pos_stride_slot;
        if (p.pos_bytes == 8) {
          *reinterpret_cast<int64_t*>(to) = *reinterpret_cast<const int64_t*>(from);
        } else {
          *reinterpret_cast<int32_t*>(to) = *reinterpret_cast<const int32_t*>(from);
        }
      }
    }
    const int batch_moves = static_cast<int>(moves - batch < 32 ? moves - batch : 32);
    for (int first = 0; first < batch_moves; first += kMovesPerGroup) {
      int src_page[kMovesPerGroup], src_off[kMovesPerGroup], dst_page[kMovesPerGroup], dst_off[kMovesPerGroup];
#pragma unroll
      for (int u = 0; u < kMovesPerGroup; ++u) {
        const int from_lane = (first + u) & 31;  // in range even past batch_moves (then unused)
        src_page[u] = __shfl_sync(0xffffffffu, my_src_page, from_lane);
        src_off[u] = __shfl_sync(0xffffffffu, my_src_off, from_lane);
        dst_page[u] = __shfl_sync(0xffffffffu, my_dst_page, from_lane);
        dst_off[u] = __shfl_sync(0xffffffffu, my_dst_off, from_lane);
      }
      const int group_size = batch_moves - first < kMovesPerGroup ? batch_moves - first : kMovesPerGroup;
      copy_group<Vec>(p, lane, group_size, src_page, src_off, dst_page, dst_off);
    }
  }
}

// Widest copy unit (16, 8, 4 or 2 bytes) that divides every row start and row size.
inline int vector_bytes(const void* k, int64_t k_stride_page_b, int64_t k_stride_slot_b, int64_t k_row_b, const void* v,
                        int64_t v_stride_page_b, int64_t v_stride_slot_b, int64_t v_row_b, int32_t elem_bytes) {
  const uint64_t bits = reinterpret_cast<uintptr_t>(k) | reinterpret_cast<uintptr_t>(v) |
                        static_cast<uint64_t>(k_stride_page_b) | static_cast<uint64_t>(k_stride_slot_b) |
                        static_cast<uint64_t>(k_row_b) | static_cast<uint64_t>(v_stride_page_b) |
                        static_cast<uint64_t>(v_stride_slot_b) | static_cast<uint64_t>(v_row_b);
  for (int width = 16; width > elem_bytes; width /= 2) {
    if ((bits & static_cast<uint64_t>(width - 1)) == 0) return width;
  }
  return elem_bytes;
}

template <class Vec>
inline int launch(Params p, int64_t k_row_bytes, int64_t v_row_bytes, int64_t num_rows, int64_t max_kept,
                  int sm_count, cudaStream_t stream) {
  p.k_chunks = static_cast<int32_t>(k_row_bytes / static_cast<int64_t>(sizeof(Vec)));
  p.v_chunks = static_cast<int32_t>(v_row_bytes / static_cast<int64_t>(sizeof(Vec)));
  // Enough blocks per row to cover its worst-case move count (max_kept), but no more than one
  // full machine of resident blocks in all: beyond that, warps loop over more batches instead.
  const int64_t batches = ceil_div<int64_t>(max_kept, 32);
  const int64_t by_work = ceil_div<int64_t>(batches, kWarpsPerBlock);
  const int64_t resident_blocks = static_cast<int64_t>(sm_count) * kMinBlocksPerSm;
  const int64_t by_machine = ceil_div<int64_t>(resident_blocks, num_rows);
  int64_t grid_y = by_work < by_machine ? by_work : by_machine;
  grid_y = grid_y < 1 ? 1 : (grid_y > 65535 ? 65535 : grid_y);
  const dim3 grid(static_cast<unsigned>(num_rows), static_cast<unsigned>(grid_y));
  compact_paged_kernel<Vec><<<grid, kThreads, 0, stream>>>(p);
  return launch_status();
}

#endif  // __CUDACC__

}  // namespace compaction
}  // namespace kvpk
