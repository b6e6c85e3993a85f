// block_gate: SeerAttention-R's AttnGate over pooled block keys in HBM
// (host/hetmem/kernels/block_gate.py); the RTL engine implements the same kernel
// (fpga/rtl/hm_block_gate.v), so the two can be compared.
//
// Arguments, in the order and with the register offsets of the kernel spec (one m_axi
// bundle per HBM buffer, named after the argument; scalars and addresses on s_axilite
// `control`):
//   keys   int8   [capacity, dim]          pooled block keys                HBM[9]
//   shifts uint8  [capacity]               row exponents: score << shift    HBM[10]
//   q      int8   [queries, dim]           gate queries, scales folded      HBM[11]
//   delta  uint32 [queries]                threshold margins (mode 1)       HBM[12]
//   out    uint32 [queries, k] or [queries, ceil(n/32)]                     HBM[26]
//   n, k, queries, dim, mode
//   segs   uint32 [queries, 2] (base, rows): query i scans blocks [base, base + rows),
//          its indices relative to base                                    HBM[13]
//   stage  uint32 [staged, 17] staged memory beats (the RTL's pre-phase)  HBM[13]
//   staged beats in stage: this kernel copies none, so staged != 0 is refused (BAD_STAGED)
//
// S_j = (Q . K_j) << shift_j (int32 dot, < 2^47 after the shift). Mode 0: top-k by the
// contract (hetmem_hls.h) over the query's rows. Mode 1: block j kept when
// S_j >= max S - delta; a bitmap row of ceil(n/32) words, bits at or past rows zero.
// One query at a time: its blocks stream once, 64 channels (one 512-bit beat) per cycle.
#include "hetmem_hls.h"

namespace {

// Blocks and channels of the build (those of the RTL's default NMAX and DMAX).
const unsigned NMAX = 65536;
const unsigned DMAX = 512;
// Channels multiplied per cycle: one 512-bit beat of int8.
const unsigned BEAT = 64;
const int SCORE_BITS = 48;

typedef ap_int<SCORE_BITS> score_t;
typedef ap_uint<SCORE_BITS> order_t;

}  // namespace

extern "C" void block_gate(const int8_t *keys, const uint8_t *shifts, const int8_t *q,
                           const uint32_t *delta, uint32_t *out, uint32_t n, uint32_t k,
                           uint32_t queries, uint32_t dim, uint32_t mode, const uint32_t *segs,
                           const uint32_t *stage, uint32_t staged) {
#pragma HLS INTERFACE m_axi port = keys offset = slave bundle = keys
#pragma HLS INTERFACE m_axi port = shifts offset = slave bundle = shifts
#pragma HLS INTERFACE m_axi port = q offset = slave bundle = q
#pragma HLS INTERFACE m_axi port = delta offset = slave bundle = delta
#pragma HLS INTERFACE m_axi port = out offset = slave bundle = out
#pragma HLS INTERFACE m_axi port = segs offset = slave bundle = segs
#pragma HLS INTERFACE m_axi port = stage offset = slave bundle = stage
#pragma HLS INTERFACE s_axilite port = keys bundle = control
#pragma HLS INTERFACE s_axilite port = shifts bundle = control
#pragma HLS INTERFACE s_axilite port = q bundle = control
#pragma HLS INTERFACE s_axilite port = delta bundle = control
#pragma HLS INTERFACE s_axilite port = out bundle = control
#pragma HLS INTERFACE s_axilite port = n bundle = control
#pragma HLS INTERFACE s_axilite port = k bundle = control
#pragma HLS INTERFACE s_axilite port = queries bundle = control
#pragma HLS INTERFACE s_axilite port = dim bundle = control
#pragma HLS INTERFACE s_axilite port = mode bundle = control
#pragma HLS INTERFACE s_axilite port = segs bundle = control
#pragma HLS INTERFACE s_axilite port = stage bundle = control
#pragma HLS INTERFACE s_axilite port = staged bundle = control
#pragma HLS INTERFACE s_axilite port = return bundle = control

  static order_t key[NMAX];  // scores, sign bit flipped: unsigned order == signed order
#pragma HLS BIND_STORAGE variable = key type = ram_2p impl = uram
  ap_int<8> qbuf[DMAX];
#pragma HLS ARRAY_PARTITION variable = qbuf cyclic factor = 64

  HM_CYCLES(hm::CONTROL_CYCLES);
  if (n == 0 || n > NMAX) HM_REFUSE(hm::BAD_N);
  if (dim == 0 || dim > DMAX) HM_REFUSE(hm::BAD_DIM);
  if (mode > 1) HM_REFUSE(hm::BAD_MODE);
  // Staged memory beats (the RTL's pre-phase) are not implemented here: refused.
  (void)stage;
  if (staged != 0) HM_REFUSE(hm::BAD_STAGED);
  // Every segment is checked before any work: a refused call writes nothing.
check_segs:
  for (unsigned i = 0; i < queries; ++i) {
#pragma HLS PIPELINE II = 1
    uint32_t rows = segs[2 * i + 1];
    if (rows == 0 || rows > n) HM_REFUSE(hm::BAD_SEGS);
    if (mode == 0 && (k == 0 || k > rows)) HM_REFUSE(hm::BAD_K);
  }
  HM_CYCLES(hm::READ_LATENCY + hm::loop_cycles(queries, 1));
  const unsigned words = (n + 31) / 32;
  const unsigned beats = (dim + BEAT - 1) / BEAT;

per_query:
  for (unsigned i = 0; i < queries; ++i) {
    const uint64_t base = segs[2 * i];
    const uint32_t rows = segs[2 * i + 1];
  load_q:
    for (unsigned c = 0; c < dim; ++c) {
#pragma HLS PIPELINE II = 1
      qbuf[c] = q[(uint64_t)i * dim + c];
    }
    HM_CYCLES(hm::READ_LATENCY + hm::loop_cycles((dim + BEAT - 1) / BEAT, 1));
    score_t top = 0;
  scan:
    for (uint32_t j = 0; j < rows; ++j) {
      const uint64_t row = base + j;
      ap_int<32> acc = 0;
    dot:
      for (unsigned b = 0; b < beats; ++b) {
#pragma HLS PIPELINE II = 1
      lanes:
        for (unsigned l = 0; l < BEAT; ++l) {
#pragma HLS UNROLL
          unsigned c = b * BEAT + l;
          if (c < dim) acc += ap_int<16>(qbuf[c] * ap_int<8>(keys[row * dim + c]));
        }
      }
      score_t s = score_t(acc) << unsigned(shifts[row]);
      if (j == 0 || s > top) top = s;
      order_t u = s;
      u[SCORE_BITS - 1] = !u[SCORE_BITS - 1];
      key[j] = u;
    }
    // keys and shifts stream on their own bundles, one beat per cycle each
    HM_CYCLES(hm::READ_LATENCY + hm::loop_cycles((uint64_t)rows * beats, 1));
    if (mode == 0) {
      hm::select_topk<SCORE_BITS>(key, rows, k, out + (uint64_t)i * k);
    } else {
      const score_t thr = top - score_t(delta[i]);
    bitmap:
      for (unsigned w = 0; w < words; ++w) {
#pragma HLS PIPELINE II = 1
        ap_uint<32> bits = 0;
        for (unsigned b = 0; b < 32; ++b) {
#pragma HLS UNROLL
          unsigned j = w * 32 + b;
          if (j < rows) {
            order_t u = key[j];
            u[SCORE_BITS - 1] = !u[SCORE_BITS - 1];
            bits[b] = score_t(u) >= thr;
          }
        }
        out[(uint64_t)i * words + w] = bits;
      }
      HM_CYCLES(hm::READ_LATENCY + hm::loop_cycles(words, 1));
    }
  }
}
