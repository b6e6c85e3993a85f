// The top functions of hetmem's HLS kernels (one per .cpp), in the argument order of the
// kernel specs (host/hetmem/kernels/): what v++ -c compiles and what the C-simulation calls.
#ifndef HETMEM_KERNELS_H
#define HETMEM_KERNELS_H

#include <stdint.h>

extern "C" {
void bm25(const uint32_t *term_offsets, const uint32_t *doc_ids, const uint16_t *impacts,
          const int32_t *terms, const uint16_t *idf, uint32_t *out, uint32_t n, uint32_t k,
          uint32_t queries, uint32_t terms_per_query, uint32_t vocab);
void block_gate(const int8_t *keys, const uint8_t *shifts, const int8_t *q,
                const uint32_t *delta, uint32_t *out, uint32_t n, uint32_t k, uint32_t queries,
                uint32_t dim, uint32_t mode, const uint32_t *segs, const uint32_t *stage,
                uint32_t staged);
}

#endif  // HETMEM_KERNELS_H
