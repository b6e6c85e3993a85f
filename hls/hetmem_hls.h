// Shared by the HLS kernels of hetmem (Vitis HLS style, C-simulated with g++ against the
// ap_types headers that hls4ml ships): the top-k selection under the kernel contract, the
// refusal codes, and the schedule counter of the C-simulation.
//
// Contract (host/hetmem/kernels/topk.py): the k largest scores; ties go to the lower index;
// output indices ascending. k outside [1, rows] is refused (nothing written).
//
// Schedule counter: under C-simulation (no __SYNTHESIS__) every loop adds the cycles its
// schedule takes (trip count x the II its pragma asks for + the pipeline depth, plus the
// HBM read latency of a burst) to hm::csim_cycles. These are the cycles the pragmas ask
// for, not a scheduler's report: the host labels them `modeled`.
#ifndef HETMEM_HLS_H
#define HETMEM_HLS_H

#include <ap_int.h>
#include <stdint.h>

namespace hm {

// Refusal codes (the C-simulation ABI returns them; the host names the argument).
enum Status {
  OK = 0,
  BAD_N = 1,        // n is 0 or beyond the build's NMAX
  BAD_K = 2,        // k outside [1, rows]
  BAD_SEGS = 3,     // a segment's rows outside [1, n]
  BAD_DIM = 4,      // dim is 0 or beyond DMAX
  BAD_MODE = 5,     // mode is neither top-k nor threshold
  BAD_TERMS = 6,    // a term id outside [-1, vocab)
  BAD_DOC_IDS = 7,  // a posting names a document >= n
  BAD_QUERIES = 8,  // more query terms than the score width holds
  BAD_STAGED = 9,   // staged memory beats: not implemented in HLS
};

// Schedule constants of the cycle count (see the file comment).
const int CONTROL_CYCLES = 25;  // ap_start to the first read, last write to ap_done
const int READ_LATENCY = 32;    // cycles from a burst's address to its first beat (modeled HBM)
const int LOOP_DEPTH = 8;       // pipeline depth of a pipelined loop (fill and drain)
const int RADIX_BITS = 8;       // bits of the score decided per histogram pass
const int BINS = 1 << RADIX_BITS;

}  // namespace hm

#ifndef __SYNTHESIS__
namespace hm {
extern thread_local uint64_t csim_cycles;
extern thread_local int csim_status;
}  // namespace hm
#define HM_CYCLES(c) (hm::csim_cycles += (uint64_t)(c))
#define HM_REFUSE(code)        \
  do {                         \
    hm::csim_status = (code);  \
    return;                    \
  } while (0)
#else
#define HM_CYCLES(c) ((void)0)
#define HM_REFUSE(code) return
#endif

namespace hm {

// Cycles of a pipelined loop of `trips` iterations at initiation interval `ii`.
inline uint64_t loop_cycles(uint64_t trips, unsigned ii) {
  return trips ? trips * ii + LOOP_DEPTH : 0;
}

// Top-k of the unsigned keys key[0, rows) into out[0, k), ascending, ties to the lower index.
// A radix select finds the k-th largest key one RADIX_BITS digit at a time (a histogram
// pass over the keys whose higher digits match, then a scan of the bins from the top); an
// index-ascending pass then emits every key above it and the first (k - #above) equal to it.
// Caller guarantees 1 <= k <= rows.
template <int W>
void select_topk(const ap_uint<W> key[], unsigned rows, unsigned k, uint32_t *out) {
  const int DIGITS = (W + RADIX_BITS - 1) / RADIX_BITS;
  ap_uint<W> prefix = 0;  // the digits of the k-th largest decided so far
  ap_uint<W> mask = 0;    // which bits those are
  unsigned need = k;      // of the keys matching prefix, how many still to take from the top
digits:
  for (int d = DIGITS - 1; d >= 0; --d) {
    unsigned hist[BINS];
#pragma HLS ARRAY_PARTITION variable = hist cyclic factor = 2
  clear:
    for (int b = 0; b < BINS; ++b) {
#pragma HLS PIPELINE II = 1
      hist[b] = 0;
    }
  count:
    for (unsigned j = 0; j < rows; ++j) {
#pragma HLS PIPELINE II = 1
#pragma HLS DEPENDENCE variable = hist inter false
      ap_uint<W> v = key[j];
      if ((v & mask) == prefix) hist[(unsigned)((v >> (RADIX_BITS * d)) & (BINS - 1))]++;
    }
    unsigned above = 0;
    int bin = 0;
  pick:
    for (int b = BINS - 1; b >= 0; --b) {
#pragma HLS PIPELINE II = 1
      if (above + hist[b] >= need) {
        bin = b;
        break;
      }
      above += hist[b];
    }
    need -= above;
    prefix |= ap_uint<W>(bin) << (RADIX_BITS * d);
    mask |= ap_uint<W>(BINS - 1) << (RADIX_BITS * d);
    HM_CYCLES(loop_cycles(BINS, 1) + loop_cycles(rows, 1) + loop_cycles(BINS, 1));
  }
  unsigned m = 0, ties = 0;
emit:
  for (unsigned j = 0; j < rows; ++j) {
#pragma HLS PIPELINE II = 1
    ap_uint<W> v = key[j];
    bool take = v > prefix;
    if (v == prefix) {
      take = ties < need;
      ties++;
    }
    if (take) out[m++] = j;
  }
  HM_CYCLES(loop_cycles(rows, 1));
}

}  // namespace hm

#endif  // HETMEM_HLS_H
