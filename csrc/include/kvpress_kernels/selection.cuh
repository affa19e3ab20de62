// Per-row top-k selection with protected tokens: radix-select of the threshold, then a stable
// block-wide prefix sum that writes the keep mask and the kept positions in ascending order.
// Torch-free: raw pointers, element strides, a stream.
//
// One block per row, all rows in one launch. Per row:
//  1. Keys. Each score maps to an order-preserving uint32 (order_key: NaN lowest, -0 == +0);
//     candidate key = order_key + 1 >= 1 for unprotected j < len, 0 for everything else, so one
//     word says both "candidate?" and "how good". When the row fits, the keys are staged in
//     shared memory and global memory is read once; otherwise every pass recomputes them.
//  2. need = budget - #protected. need <= 0 keeps only the protected tokens; need >= #candidates
//     keeps every valid token; otherwise:
//  3. Radix select, most significant byte first: a 256-bin shared histogram of the current digit
//     over the candidates that match the digits chosen so far (warp-aggregated atomics, since
//     scores cluster in a few bins), then a block scan over the bins from the top finds the bin
//     that holds the need-th largest key. If that bin is taken whole, stop early: the threshold
//     is "key >= prefix". After four passes the threshold key T and the number of its ties to
//     keep are known.
//  4. Compaction: tiles of kThreads x kItems consecutive positions; one block scan of a packed
//     pair (#kept-for-sure, #ties) gives each position its output slot, ties taken by lower
//     position first. Then -1 padding.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "kvpress_kernels/api.h"
#include "kvpress_kernels/common.cuh"

#if defined(__CUDACC__)
#include <cuda_fp16.h>

#include <cub/block/block_scan.cuh>
#endif

namespace kvpk {
namespace selection {

constexpr int kThreads = 512;
constexpr int kItems = 8;  // consecutive positions per thread in the compaction pass
constexpr int kTile = kThreads * kItems;
constexpr int kBins = 256;
constexpr int kPasses = 4;                  // 8-bit digits of a 32-bit key
constexpr uint32_t kKeepNone = 0xFFFFFFFFu;  // a threshold no candidate key reaches
// Two resident blocks per SM (<= 64 registers) when the key cache is small enough to allow it.
constexpr int kMinBlocksPerSm = 2;

// ------------------------------------------------------------------------------------------
// Host/device pieces of the algorithm (the host emulation in host_checks.cpp shares them).
// ------------------------------------------------------------------------------------------
KVPK_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

// Order-preserving map float -> uint32: a < b  <=>  order_key(a) < order_key(b). NaN maps to 0,
// below -inf (whose key is 0x007FFFFF); -0 maps to +0's key so that they tie, as they compare equal.
KVPK_HD uint32_t order_key(float x) {
  if (x != x) return 0u;
  if (x == 0.0f) return 0x80000000u;
  const uint32_t u = float_bits(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

KVPK_HD bool protected_position(int j, int len, int sink, int recent) { return j < sink || j >= len - recent; }

// Kept candidates: key > key_threshold, plus the first `ties` (by position) with key == key_threshold.
struct Threshold {
  uint32_t key;
  int ties;
};

struct RadixState {
  uint32_t prefix;  // digits chosen so far
  uint32_t mask;    // their bits
  int rank;         // rank (1 = largest) of the wanted key among the candidates matching prefix
};

// The two cases that need no radix pass. Returns true (and sets `out`) when one applies.
KVPK_HD bool trivial_threshold(int need, int candidates, Threshold& out) {
  if (need <= 0) {
    out = Threshold{kKeepNone, 0};
    return true;
  }
  if (need >= candidates) {
    out = Threshold{0u, 0};  // every key >= 1 passes
    return true;
  }
  return false;
}

KVPK_HD int radix_shift(int pass) { return 24 - 8 * pass; }

KVPK_HD bool radix_matches(uint32_t key, const RadixState& st) { return key != 0u && (key & st.mask) == st.prefix; }

// Scanning bins from the top, `through` = keys in this bin and above, `bin_count` = in this bin:
// the bin holds the wanted rank iff the count above it is < rank <= through.
KVPK_HD bool bin_holds_rank(int through, int bin_count, int rank) { return through >= rank && through - bin_count < rank; }

// Fix the digit of `pass`; returns true (and sets `out`) once the threshold is known.
KVPK_HD bool radix_advance(RadixState& st, int pass, int digit, int above, int bin_count, Threshold& out) {
  const int shift = radix_shift(pass);
  st.prefix |= static_cast<uint32_t>(digit) << shift;
  st.mask |= 0xFFu << shift;
  st.rank -= above;
  if (bin_count == st.rank) {
    // The whole bin is kept: keep every key >= prefix (lower digits zero). prefix > 0 here, as a
    // zero prefix taken whole would mean every candidate is kept, a trivial case.
    out = Threshold{st.prefix == 0u ? 0u : st.prefix - 1u, 0};
    return true;
  }
  if (pass == kPasses - 1) {
    out = Threshold{st.prefix, st.rank};
    return true;
  }
  return false;
}

// Keep decision of one position from its key and the number of ties before it.
KVPK_HD bool sure_keep(bool valid, uint32_t key, const Threshold& thr) { return valid && (key == 0u || key > thr.key); }
KVPK_HD bool is_tie(uint32_t key, const Threshold& thr) { return key != 0u && key == thr.key; }

#if defined(__CUDACC__)

struct Params {
  const char* scores;  // addressed in bytes
  int64_t scores_stride_row, scores_stride_col;  // bytes
  int32_t score_dtype;
  IndexView1D budgets;
  IndexView1D lengths;
  const uint8_t* protect;  // NULL when absent
  int64_t protect_stride_row, protect_stride_col;
  int32_t sink, recent;
  uint8_t* mask;
  int64_t mask_stride_row, mask_stride_col;
  IndexView2D kept;
  int32_t num_cols;
  int32_t max_kept;
};

__device__ __forceinline__ float load_score(const char* p, int32_t dtype) {
  switch (dtype) {
    case KVPK_DTYPE_FLOAT16:
      return __half2float(*reinterpret_cast<const __half*>(p));
    case KVPK_DTYPE_BFLOAT16:  // bf16 is the top half of an fp32
      return __uint_as_float(static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(p)) << 16);
    default:
      return *reinterpret_cast<const float*>(p);
  }
}

// Adds one to bin (key >> shift) & 0xFF for every lane with `take`; lanes of a warp that hit the
// same bin are merged into one atomic (scores of a row share their top digits, so they collide).
// Must be called by all 32 lanes.
__device__ __forceinline__ void histogram_add(int* hist, uint32_t key, bool take, int shift) {
  const unsigned bin = take ? (key >> shift) & 0xFFu : static_cast<unsigned>(kBins);
  const unsigned peers = __match_any_sync(0xffffffffu, bin);
  const int leader = __ffs(static_cast<int>(peers)) - 1;
  if (take && static_cast<int>(threadIdx.x & 31u) == leader) atomicAdd(&hist[bin], __popc(peers));
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <bool kCached>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) select_topk_kernel(const Params p) {
  using ScanInt = cub::BlockScan<int, kThreads>;
  using ScanPair = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ union {
    typename ScanInt::TempStorage bins;
    typename ScanPair::TempStorage pairs;
  } scan_storage;
  __shared__ int hist[kBins];
  __shared__ int s_protected;
  __shared__ int s_digit, s_above, s_bin;
  extern __shared__ uint4 cache_words[];  // kCached: the row's keys, padded to a multiple of kItems
  uint32_t* const cache = reinterpret_cast<uint32_t*>(cache_words);

  const int64_t row = blockIdx.x;
  const int t = static_cast<int>(threadIdx.x);
  const int num_cols = p.num_cols;
  const int64_t length = p.lengths.load(row);
  const int len = static_cast<int>(length < 0 ? 0 : (length > num_cols ? num_cols : length));
  const int64_t budget_in = p.budgets.load(row);
  const int budget = static_cast<int>(budget_in < 0 ? 0 : (budget_in > len ? len : budget_in));
  const char* const scores = p.scores + row * p.scores_stride_row;
  const uint8_t* const protect = p.protect != nullptr ? p.protect + row * p.protect_stride_row : nullptr;

  auto compute_key = [&](int j) -> uint32_t {
    if (j >= len || protected_position(j, len, p.sink, p.recent)) return 0u;
    if (protect != nullptr && protect[j * p.protect_stride_col] != 0) return 0u;
    return order_key(load_score(scores + j * p.scores_stride_col, p.score_dtype)) + 1u;
  };
  auto key_at = [&](int j) -> uint32_t {
    if constexpr (kCached) {
      return cache[j];
    } else {
      return compute_key(j);
    }
  };

  // Pass 0: keys (staged when cached), protected count, histogram of the top digit.
  for (int i = t; i < kBins; i += kThreads) hist[i] = 0;
  if (t == 0) s_protected = 0;
  __syncthreads();
  const int padded_cols = static_cast<int>(ceil_div<int64_t>(num_cols, kItems) * kItems);
  const int first_end = kCached ? padded_cols : len;
  int my_protected = 0;
  for (int base = 0; base < first_end; base += kThreads) {
    const int j = base + t;
    const uint32_t key = j < num_cols ? compute_key(j) : 0u;
    if (kCached && j < first_end) cache[j] = key;
    my_protected += (j < len && key == 0u) ? 1 : 0;
    histogram_add(hist, key, key != 0u, radix_shift(0));
  }
  my_protected = warp_sum(my_protected);
  if ((t & 31) == 0 && my_protected != 0) atomicAdd(&s_protected, my_protected);
  __syncthreads();

  const int protected_count = s_protected;
  const int candidates = len - protected_count;
  Threshold thr{kKeepNone, 0};
  bool known = trivial_threshold(budget - protected_count, candidates, thr);
  RadixState st{0u, 0u, budget - protected_count};
  for (int pass = 0; !known; ++pass) {  // block-uniform: every thread holds the same state
    if (pass > 0) {
      for (int i = t; i < kBins; i += kThreads) hist[i] = 0;
      __syncthreads();
      const int shift = radix_shift(pass);
      for (int base = 0; base < len; base += kThreads) {
        const int j = base + t;
        const uint32_t key = j < len ? key_at(j) : 0u;
        histogram_add(hist, key, radix_matches(key, st), shift);
      }
      __syncthreads();
    }
    const int count = t < kBins ? hist[kBins - 1 - t] : 0;
    int through = 0;
    ScanInt(scan_storage.bins).InclusiveSum(count, through);
    if (t < kBins && bin_holds_rank(through, count, st.rank)) {  // exactly one thread
      s_digit = kBins - 1 - t;
      s_above = through - count;
      s_bin = count;
    }
    __syncthreads();
    known = radix_advance(st, pass, s_digit, s_above, s_bin, thr);
  }

  // Compaction: output slot of a kept position = #sure keeps before it + min(#ties before it, ties).
  const IndexView1D kept = p.kept.row(row);
  uint8_t* const mask = p.mask + row * p.mask_stride_row;
  int sure_carry = 0, tie_carry = 0;
  for (int tile = 0; tile < num_cols; tile += kTile) {
    const int j0 = tile + t * kItems;
    uint32_t keys[kItems];
    if constexpr (kCached) {
      if (j0 < padded_cols) {  // j0 and padded_cols are multiples of kItems (= 8 words, 32 bytes)
        const uint4 lo = *reinterpret_cast<const uint4*>(cache + j0);
        const uint4 hi = *reinterpret_cast<const uint4*>(cache + j0 + 4);
        keys[0] = lo.x, keys[1] = lo.y, keys[2] = lo.z, keys[3] = lo.w;
        keys[4] = hi.x, keys[5] = hi.y, keys[6] = hi.z, keys[7] = hi.w;
      } else {
#pragma unroll
        for (int i = 0; i < kItems; ++i) keys[i] = 0u;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kItems; ++i) keys[i] = j0 + i < num_cols ? compute_key(j0 + i) : 0u;
    }
    int sure_count = 0, tie_count = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      sure_count += sure_keep(j0 + i < len, keys[i], thr) ? 1 : 0;
      tie_count += is_tie(keys[i], thr) ? 1 : 0;
    }
    // Both counts in one scan: per tile they are < 2^32, so the halves never carry into each other.
    const unsigned long long packed = (static_cast<unsigned long long>(sure_count) << 32) | static_cast<unsigned>(tie_count);
    unsigned long long before = 0, tile_total = 0;
    ScanPair(scan_storage.pairs).ExclusiveSum(packed, before, tile_total);
    int sure_before = sure_carry + static_cast<int>(before >> 32);
    int tie_before = tie_carry + static_cast<int>(before & 0xFFFFFFFFull);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int j = j0 + i;
      const bool sure = sure_keep(j < len, keys[i], thr);
      const bool tie = is_tie(keys[i], thr);
      const bool keep = sure || (tie && tie_before < thr.ties);
      if (j < num_cols) mask[j * p.mask_stride_col] = keep ? 1 : 0;
      if (keep) {
        const int slot = sure_before + (tie_before < thr.ties ? tie_before : thr.ties);
        if (slot < p.max_kept) kept.store(slot, j);
      }
      sure_before += sure ? 1 : 0;
      tie_before += tie ? 1 : 0;
    }
    sure_carry += static_cast<int>(tile_total >> 32);
    tie_carry += static_cast<int>(tile_total & 0xFFFFFFFFull);
    __syncthreads();  // scan_storage is reused by the next tile
  }
  const int total = sure_carry + (tie_carry < thr.ties ? tie_carry : thr.ties);
  for (int slot = total + t; slot < p.max_kept; slot += kThreads) kept.store(slot, -1);
}

#endif  // __CUDACC__

}  // namespace selection
}  // namespace kvpk
