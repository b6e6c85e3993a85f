// The C-simulation ABI the host loads with ctypes (host/hetmem/fpga/hls.py): one function
// per kernel, hm_csim_<kernel>(the top's arguments..., uint64_t *cycles), that runs the top
// function and returns its refusal code (hm::Status, 0 when the call ran) and the cycles
// its schedule counted. Never synthesized.
#include "hetmem_hls.h"
#include "kernels.h"

namespace hm {
thread_local uint64_t csim_cycles = 0;
thread_local int csim_status = 0;
}  // namespace hm

static void start() {
  hm::csim_cycles = 0;
  hm::csim_status = hm::OK;
}

static int finish(uint64_t *cycles) {
  if (cycles) *cycles = hm::csim_cycles;
  return hm::csim_status;
}

extern "C" {

int hm_csim_bm25(const uint32_t *term_offsets, const uint32_t *doc_ids, const uint16_t *impacts,
                 const int32_t *terms, const uint16_t *idf, uint32_t *out, uint32_t n, uint32_t k,
                 uint32_t queries, uint32_t terms_per_query, uint32_t vocab, uint64_t *cycles) {
  start();
  bm25(term_offsets, doc_ids, impacts, terms, idf, out, n, k, queries, terms_per_query, vocab);
  return finish(cycles);
}

int hm_csim_block_gate(const int8_t *keys, const uint8_t *shifts, const int8_t *q,
                       const uint32_t *delta, uint32_t *out, uint32_t n, uint32_t k,
                       uint32_t queries, uint32_t dim, uint32_t mode, const uint32_t *segs,
                       const uint32_t *stage, uint32_t staged, uint64_t *cycles) {
  start();
  block_gate(keys, shifts, q, delta, out, n, k, queries, dim, mode, segs, stage, staged);
  return finish(cycles);
}

}  // extern "C"
