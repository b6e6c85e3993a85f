"""The RTL engine's hardware facts, in one place: its parameters (the defaults of
fpga/rtl/hm_engine.v and of every kernel top), the kernel ids it is built for, and how each
kernel spec's arguments bind to the engine's fields (its register map is the spec's:
`KernelSpec.registers()`). `fpga/gen.py` generates the register-map include, the kernel tops
and the Vitis packaging from these and the specs; `spec.ENGINES` takes the cycle model's lanes,
slots and scan width from here; the RTL benches read them. Plain data: no imports of the
specs, so anything may import it.
"""

from __future__ import annotations

from types import MappingProxyType

#: Engine parameters and their defaults (hm_engine's, every kernel top's). LANES: dot-product
#: lanes (query vectors per pass); SLOTS: queries whose scores are kept at once (<= LANES);
#: NMAX: rows per call (a power of two); DMAX: channels per row (a multiple of 64); SCAN:
#: scores per cycle of the selection scans.
PARAMS = MappingProxyType({"LANES": 8, "SLOTS": 8, "NMAX": 65536, "DMAX": 512, "SCAN": 64})
LANES = PARAMS["LANES"]
SLOTS = PARAMS["SLOTS"]
NMAX = PARAMS["NMAX"]
DMAX = PARAMS["DMAX"]
SCAN = PARAMS["SCAN"]

#: Kernel id (the engine's `kernel` input) of every kernel the engine runs; bm25 has no RTL.
KERNEL_IDS = MappingProxyType(
    {"token_indexer": 0, "page_indexer": 1, "vector_search": 2, "block_gate": 3}
)

#: Engine fields: buffers 0..7 (64-bit addresses), scalars 8..14.
FIELD_IDS = MappingProxyType(
    {
        "A": 0,
        "B": 1,
        "Q": 2,
        "W": 3,
        "D": 4,
        "OUT": 5,
        "S": 6,
        "G": 7,
        "N": 8,
        "K": 9,
        "QUERIES": 10,
        "HEADS": 11,
        "DIM": 12,
        "MODE": 13,
        "STAGED": 14,
    }
)
#: Buffer fields come first: a field id below this is an address.
BUFFER_FIELDS = 8

#: The engine's AXI4 masters, by field: memory rows stream on two ports, the query side
#: (query vectors, head weights, threshold deltas, segments, staged beats) shares one,
#: results go out on one.
PORT_OF_FIELD = MappingProxyType(
    {
        "A": "m_axi_mem_a",
        "B": "m_axi_mem_b",
        "Q": "m_axi_query",
        "W": "m_axi_query",
        "D": "m_axi_query",
        "S": "m_axi_query",
        "G": "m_axi_query",
        "OUT": "m_axi_out",
    }
)

#: What the engine implements, per kernel: (argument, engine field, dtype), in spec order.
FORMATS: MappingProxyType[str, tuple[tuple[str, str, str], ...]] = MappingProxyType(
    {
        "token_indexer": (
            ("keys", "A", "int8"),
            ("shifts", "B", "uint8"),
            ("q", "Q", "int8"),
            ("w", "W", "int16"),
            ("out", "OUT", "uint32"),
            ("n", "N", "uint32"),
            ("k", "K", "uint32"),
            ("queries", "QUERIES", "uint32"),
            ("heads", "HEADS", "uint32"),
            ("dim", "DIM", "uint32"),
            ("segs", "S", "uint32"),
            ("stage", "G", "uint32"),
            ("staged", "STAGED", "uint32"),
        ),
        "page_indexer": (
            ("mins", "A", "int16"),
            ("maxs", "B", "int16"),
            ("q", "Q", "int8"),
            ("out", "OUT", "uint32"),
            ("n", "N", "uint32"),
            ("k", "K", "uint32"),
            ("queries", "QUERIES", "uint32"),
            ("heads", "HEADS", "uint32"),
            ("dim", "DIM", "uint32"),
            ("segs", "S", "uint32"),
            ("stage", "G", "uint32"),
            ("staged", "STAGED", "uint32"),
        ),
        "vector_search": (
            ("keys", "A", "int8"),
            ("shifts", "B", "uint8"),
            ("q", "Q", "int8"),
            ("out", "OUT", "uint32"),
            ("n", "N", "uint32"),
            ("k", "K", "uint32"),
            ("queries", "QUERIES", "uint32"),
            ("dim", "DIM", "uint32"),
            ("segs", "S", "uint32"),
            ("stage", "G", "uint32"),
            ("staged", "STAGED", "uint32"),
        ),
        "block_gate": (
            ("keys", "A", "int8"),
            ("shifts", "B", "uint8"),
            ("q", "Q", "int8"),
            ("delta", "D", "uint32"),
            ("out", "OUT", "uint32"),
            ("n", "N", "uint32"),
            ("k", "K", "uint32"),
            ("queries", "QUERIES", "uint32"),
            ("dim", "DIM", "uint32"),
            ("mode", "MODE", "uint32"),
            ("segs", "S", "uint32"),
            ("stage", "G", "uint32"),
            ("staged", "STAGED", "uint32"),
        ),
    }
)


def field_of(kernel: str) -> dict[str, str]:
    """Argument -> engine field of one kernel."""
    return {arg: field for arg, field, _ in FORMATS[kernel]}


def port_of(kernel: str, arg: str) -> str:
    """The AXI4 master that carries a buffer argument of a kernel: the engine's port for a
    kernel it implements (the query side shares one), else the argument's own bundle (an
    HLS kernel's `m_axi_<arg>`)."""
    for name, field, _ in FORMATS.get(kernel, ()):
        if name == arg and field in PORT_OF_FIELD:
            return PORT_OF_FIELD[field]
    return f"m_axi_{arg}"
