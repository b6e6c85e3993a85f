// A self-checking C-simulation testbench of the HLS kernels on hand-computed cases (what
// `vitis_hls` csim_design runs; `make -C hls csim` runs it with g++). The randomized
// comparison with the golden models is tests/test_hls.py.
#include <cstdio>

#include "../hetmem_hls.h"
#include "../kernels.h"

static int failures = 0;

static void expect(const char *what, const uint32_t *got, const uint32_t *want, int count) {
  for (int i = 0; i < count; ++i) {
    if (got[i] != want[i]) {
      std::printf("FAIL %s: [%d] = %u, expected %u\n", what, i, got[i], want[i]);
      failures++;
      return;
    }
  }
  std::printf("ok   %s\n", what);
}

int main() {
  {  // bm25: term 0 -> docs {0, 2}, term 1 -> docs {1, 2}
    const uint32_t offsets[] = {0, 2, 4};
    const uint32_t docs[] = {0, 2, 1, 2};
    const uint16_t impacts[] = {100, 200, 300, 50};
    const int32_t terms[] = {0, 1, 1, -1, 0, -1};
    const uint16_t idf[] = {1, 1, 2, 0, 1, 0};
    uint32_t out[6] = {0};
    bm25(offsets, docs, impacts, terms, idf, out, 3, 2, 3, 2, 2);
    // scores: q0 (100, 300, 250) -> {1, 2}; q1 (0, 600, 100) -> {1, 2}; q2 (100, 0, 200)
    const uint32_t want[] = {1, 2, 1, 2, 0, 2};
    expect("bm25 top-2", out, want, 6);
  }
  {  // block_gate: scores (1, 1, 2, -1): ties to the lower index
    const int8_t keys[] = {1, 0, 0, 1, 1, 1, -1, 0};
    const uint8_t shifts[] = {0, 0, 0, 0};
    const int8_t q[] = {1, 1};
    const uint32_t delta[] = {1};
    const uint32_t segs[] = {0, 4};
    uint32_t out[2] = {0};
    block_gate(keys, shifts, q, delta, out, 4, 2, 1, 2, 0, segs, nullptr, 0);
    const uint32_t want_topk[] = {0, 2};
    expect("block_gate top-2", out, want_topk, 2);
    block_gate(keys, shifts, q, delta, out, 4, 0, 1, 2, 1, segs, nullptr, 0);
    const uint32_t want_bits[] = {0x7};  // S >= 2 - 1
    expect("block_gate threshold", out, want_bits, 1);
    const uint32_t tail[] = {1, 3};  // blocks 1..3 as one segment: scores (1, 2, -1)
    block_gate(keys, shifts, q, delta, out, 4, 1, 1, 2, 0, tail, nullptr, 0);
    const uint32_t want_seg[] = {1};
    expect("block_gate segment", out, want_seg, 1);
  }
  std::printf("%s\n", failures ? "C-simulation FAILED" : "C-simulation passed");
  return failures ? 1 : 0;
}
