"""The learned scorers' projections as hls4ml-generated HLS C++, C-simulated with g++ and held
bit for bit against a golden fixed-point model.

What is converted: the linear maps of a learned selector, each one torch module (`LinearMap`, a
bias-free `nn.Linear`) that hls4ml converts (PyTorch frontend, Vitis backend, io_parallel,
Latency strategy; hls4ml core only) into an HLS project and compiles with g++, which is its C
simulation:

- SeerAttention-R's AttnGate (`GateWeights`, methods/seer.py): the key map wk [Hkv, 3D, Dg]
  (a block's keys pooled by max, min and mean -> its gate key) and the query map
  wq [Hkv, R*D, Dg] (a KV group's R query heads -> its gate query). Each map covers every KV
  head at once: one Dense of Hkv*in -> Hkv*Dg whose weight is block-diagonal by head (`
  block_diagonal`; hls4ml counts the zeros, n_zeros, and HLS drops their products).
- DSA's lightning indexer (`IndexerWeights`, methods/dsa.py): the key map wk [F, Di] and the
  query map wq [Fq, H*Di].

Precision, per model layer and map, from hls4ml's numerical profiling (`profile`:
`hls4ml.model.profiling.weights_torch` and `activations_torch` on calibration activations,
`array_to_summary` on the inputs, the boxplot summaries' `whishi`, the largest magnitude):
integer bits = floor(log2(peak)) + 2 (the sign and the profiled peak, so nothing profiled
saturates), widths by design (`WIDTHS`): input 16, weight 16, result 8. An 8-bit result is
the int8 of the `block_gate` kernel: the gate keys and queries go to it as they are (row
shift 0), so the AttnGate and the block gate chain on the card without a host step. The
input and the result round to nearest, ties to even (AP_RND_CONV) and saturate (AP_SAT);
weights are rounded the same way here, before hls4ml sees them, so the values it writes are
exact. The accumulator is hls4ml's 'auto': it infers a width that holds every sum exactly.

The golden model (`golden_dense`) reads the types hls4ml gave the compiled layer (the input's
result_t, weight_t, accum_t, result_t) and does what its Dense (nnet_dense_latency.h) does in
integers: the input cast from double by the input type's modes, each product cast to accum_t,
the sum wrapping in accum_t, the cast to result_t by its modes. So the golden model adopts
hls4ml's precision exactly, and `GateMap.csim` (the g++-compiled project, called through the
C bridge hls4ml generates) equals `GateMap.golden` bit for bit (tests/test_hls4ml_gate.py).

Built projects are cached by a hash of the weights, the precision, hls4ml's version and g++
($HETMEM_CACHE/hls4ml, else build/hls4ml/ in the repository): the C simulation reads its
weights from the project folder, so a project is built where it stays.

    python -m hetmem.fpga.hls4ml_gate profile   # profile the bundled model, write the precisions
    python -m hetmem.fpga.hls4ml_gate csim      # build every map, C-simulate, compare to golden

The rooms: `fixed` (the fixed-point types, the precision choice, the golden Dense; numpy
only), `maps` (the torch modules and hls4ml's profiling of them), `build` (conversion, C
simulation, the project cache: `GateMap`, `build_map`), `bundled` (the bundled model's
selectors: calibration activations, `profile_bundled`, the committed precisions,
`bundled_maps`), `selection` (integer scores from the maps, recall, stress inputs) and
`__main__` (the command line). Nothing is imported here: name the module.
"""
