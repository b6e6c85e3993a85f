"""Which kernels this repository implements in hardware, and in what.

Read by the targets that run them (cosim: the Verilog in fpga/rtl; hls: the C++ in hls/) and
by the manifest, which records what each xclbin kernel is built from. Apart from both so
that the manifest (data about bitstreams) does not import a target.
"""

from __future__ import annotations

from ..kernels.engine import KERNEL_IDS

#: Kernels with RTL (fpga/rtl/hm_<kernel>.v: the engine's kernel ids); cosim raises
#: XclbinError for every other spec.
RTL_KERNELS = tuple(KERNEL_IDS)
#: Kernels with an HLS implementation (hls/<kernel>.cpp); every other spec raises XclbinError.
HLS_KERNELS = ("bm25", "block_gate")
