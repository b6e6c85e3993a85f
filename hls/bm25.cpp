// bm25: BM25 retrieval over an inverted index in HBM (host/hetmem/kernels/bm25.py).
//
// Arguments, in the order and with the register offsets of the kernel spec (one m_axi
// bundle per HBM buffer, named after the argument; scalars and addresses on s_axilite
// `control`):
//   term_offsets uint32 [vocab + 1]   CSR offsets per term            HBM[18]
//   doc_ids      uint32 [postings]    posting doc ids, by term        HBM[19]
//   impacts      uint16 [postings]    UQ0.16 normalized tf            HBM[20]
//   terms        int32  [queries, T]  query term ids, -1 pads         HBM[21]
//   idf          uint16 [queries, T]  per-query scaled idf            HBM[22]
//   out          uint32 [queries, k]  top-k document ids, ascending   HBM[23]
//   n, k, queries, terms_per_query, vocab
//
// score(d) = sum over the query's terms t of idf_t * impact_td (exact: at most
// T * 65535^2, held in SCORE_BITS), accumulated in an on-chip score array of NMAX
// documents; top-k by the contract (hetmem_hls.h). Documents no term matches score 0.
#include "hetmem_hls.h"

namespace {

// Documents the on-chip score array holds (URAM: 2^20 x 48 bits).
const unsigned NMAX = 1u << 20;
// Score width: T * 65535^2 < 2^48 for T <= 65536 terms per query.
const int SCORE_BITS = 48;
const unsigned TMAX = 65536;

typedef ap_uint<SCORE_BITS> score_t;

}  // namespace

extern "C" void bm25(const uint32_t *term_offsets, const uint32_t *doc_ids,
                     const uint16_t *impacts, const int32_t *terms, const uint16_t *idf,
                     uint32_t *out, uint32_t n, uint32_t k, uint32_t queries,
                     uint32_t terms_per_query, uint32_t vocab) {
#pragma HLS INTERFACE m_axi port = term_offsets offset = slave bundle = term_offsets
#pragma HLS INTERFACE m_axi port = doc_ids offset = slave bundle = doc_ids
#pragma HLS INTERFACE m_axi port = impacts offset = slave bundle = impacts
#pragma HLS INTERFACE m_axi port = terms offset = slave bundle = terms
#pragma HLS INTERFACE m_axi port = idf offset = slave bundle = idf
#pragma HLS INTERFACE m_axi port = out offset = slave bundle = out
#pragma HLS INTERFACE s_axilite port = term_offsets bundle = control
#pragma HLS INTERFACE s_axilite port = doc_ids bundle = control
#pragma HLS INTERFACE s_axilite port = impacts bundle = control
#pragma HLS INTERFACE s_axilite port = terms bundle = control
#pragma HLS INTERFACE s_axilite port = idf bundle = control
#pragma HLS INTERFACE s_axilite port = out bundle = control
#pragma HLS INTERFACE s_axilite port = n bundle = control
#pragma HLS INTERFACE s_axilite port = k bundle = control
#pragma HLS INTERFACE s_axilite port = queries bundle = control
#pragma HLS INTERFACE s_axilite port = terms_per_query bundle = control
#pragma HLS INTERFACE s_axilite port = vocab bundle = control
#pragma HLS INTERFACE s_axilite port = return bundle = control

  static score_t score[NMAX];
#pragma HLS BIND_STORAGE variable = score type = ram_2p impl = uram

  HM_CYCLES(hm::CONTROL_CYCLES);
  if (n == 0 || n > NMAX) HM_REFUSE(hm::BAD_N);
  if (k == 0 || k > n) HM_REFUSE(hm::BAD_K);
  if (terms_per_query > TMAX) HM_REFUSE(hm::BAD_QUERIES);
  // Every term id is checked before any work: a refused call writes nothing.
check_terms:
  for (uint64_t i = 0; i < (uint64_t)queries * terms_per_query; ++i) {
#pragma HLS PIPELINE II = 1
    int32_t t = terms[i];
    if (t < -1 || (t >= 0 && (uint32_t)t >= vocab)) HM_REFUSE(hm::BAD_TERMS);
  }
  HM_CYCLES(hm::READ_LATENCY + hm::loop_cycles((uint64_t)queries * terms_per_query, 1));

clear:
  for (unsigned d = 0; d < n; ++d) {
#pragma HLS PIPELINE II = 1
    score[d] = 0;
  }
  HM_CYCLES(hm::loop_cycles(n, 1));

per_query:
  for (unsigned q = 0; q < queries; ++q) {
  per_term:
    for (unsigned t = 0; t < terms_per_query; ++t) {
      uint64_t at = (uint64_t)q * terms_per_query + t;
      int32_t term = terms[at];
      if (term < 0) continue;
      ap_uint<16> w = idf[at];
      uint32_t start = term_offsets[term], stop = term_offsets[term + 1];
      HM_CYCLES(hm::READ_LATENCY);  // the two offsets, then the postings burst
      // A term's postings name distinct documents: no dependence between iterations.
    postings:
      for (uint32_t p = start; p < stop; ++p) {
#pragma HLS PIPELINE II = 1
#pragma HLS DEPENDENCE variable = score inter false
        uint32_t d = doc_ids[p];
        if (d >= n) HM_REFUSE(hm::BAD_DOC_IDS);  // the host checks its index before a launch
        score[d] += score_t(w * ap_uint<16>(impacts[p]));
      }
      HM_CYCLES(hm::READ_LATENCY + hm::loop_cycles(stop > start ? stop - start : 0, 1));
    }
    hm::select_topk<SCORE_BITS>(score, n, k, out + (uint64_t)q * k);
    // The next query starts from zero scores (a pass the emit scan could absorb).
  reset:
    for (unsigned d = 0; d < n; ++d) {
#pragma HLS PIPELINE II = 1
      score[d] = 0;
    }
    HM_CYCLES(hm::loop_cycles(n, 1));
  }
}
