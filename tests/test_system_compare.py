"""`hetmem.system.compare`: the grid, the crossover search, the engine what-if and the
check against the paper. Model figures are checked for their structure and against the
schedules they come from, never against timings of this machine."""

from __future__ import annotations

import pytest

from hetmem.errors import InputError
from hetmem.system import (
    BUILTIN,
    Figure,
    ProfileError,
    Shape,
    System,
    get_model,
    memory_share,
    schedule,
    schedule_energy,
)
from hetmem.system.compare import (
    PAPER,
    break_even,
    compare,
    crossover,
    evaluate,
    figure_source,
    parse_list,
    parse_tokens,
    systems_of,
)

LLAMA = get_model("Llama-3.1-8B")


def fast_card(clock_hz: float):
    """A hypothetical U55C whose engine runs at `clock_hz` (every cycle term scales)."""
    return BUILTIN["U55C"].with_figures(clock_hz=Figure(clock_hz, "Hz", "hypothetical", "assumed"))


def test_a_row_is_its_schedules():
    system = System.of("MI210", "U55C")
    shape = Shape(LLAMA, 65536, 4)
    row = evaluate("quest", shape, system)
    gpu = schedule("quest", shape, system, "gpu")
    seq = schedule("quest", shape, system, "sequential")
    ovl = schedule("quest", shape, system, "overlapped")
    assert row.speedup == pytest.approx(gpu.seconds / seq.seconds)
    assert row.speedup_overlapped == pytest.approx(gpu.seconds / ovl.seconds)
    assert row.energy_ratio == pytest.approx(
        schedule_energy(gpu).total / schedule_energy(seq).total
    )
    assert row.memory_share == pytest.approx(memory_share(gpu))
    assert row.overlap_gain == pytest.approx(seq.seconds / ovl.seconds)
    assert row.source == "modeled" and "datasheet" in row.basis


def test_crossover_with_todays_engine_never_pays_and_says_what_it_needs():
    system = System.of("MI210", "U55C")
    cmp = compare([LLAMA], ["quest", "dense_rag"], [4096, 131072], [1, 8], [system])
    (quest,) = [c for c in cmp.crossovers if c.method == "quest"]
    assert quest.never and quest.summary.startswith("never in the grid")
    be = quest.what_if
    assert be is not None and be.needed_factor > 1
    assert "faster engine" in be.verdict and "GB/s" in be.verdict
    # the break-even: the card's step at needed_factor x its speed equals the GPU's
    assert be.card_s / be.needed_factor + be.link_s == pytest.approx(be.gpu_select_s)
    assert be.needed_bw == pytest.approx(be.card_bytes / (be.gpu_select_s - be.link_s))
    (rag,) = [c for c in cmp.crossovers if c.method == "dense_rag"]
    assert rag.never and rag.what_if is None and "once per request" in rag.summary


def test_crossover_start_and_stop_follow_the_rows():
    """With an engine 50x faster the card pays at long contexts; the crossover's first and
    last paying contexts are exactly the rows' speedup > 1."""
    system = System.of("MI210", fast_card(15e9))
    contexts, batches = [4096, 16384, 131072, 1048576], [1, 16]
    cmp = compare([LLAMA], ["quest"], contexts, batches, [system])
    (c,) = cmp.crossovers
    assert not c.never and "pays" in c.summary
    for b in batches:
        want = [r.context for r in cmp.rows if r.batch == b and r.speedup_overlapped > 1]
        assert c.pays[b] == want
        start, stop = c.start_stop(b)
        assert start == (want[0] if want else None)
        if stop is not None:
            assert stop > start and stop not in want
    rows = [r for r in cmp.rows if r.batch == 16]
    assert max(r.speedup_overlapped for r in rows) > 1
    assert {r.choice for r in rows} == {"gpu alone", "offload (overlapped)"}  # the choice flips


def test_crossover_of_an_unknown_cell_is_a_named_error():
    system = System.of("MI210", "U55C")
    cmp = compare([LLAMA], ["seer"], [4096], [1], [system])
    with pytest.raises(InputError, match="rows"):
        crossover(cmp.rows, system, LLAMA, "quest")


def test_break_even_is_none_where_nothing_is_offloaded():
    system = System.of("MI210", "U55C")
    assert break_even("bm25_rag", Shape(LLAMA, 65536), system) is None
    assert break_even("quest", Shape(LLAMA, 1024, budget=2048), system) is None  # budget covers all


def test_paper_check_states_agreement_per_method():
    system = System.of("MI210", "U55C")
    cmp = compare([LLAMA], ["dsa", "seer"], [4096, 65536], [1, 8], [system])
    assert [p.method for p in cmp.paper] == ["dsa", "seer"]
    for p in cmp.paper:
        rows = [r for r in cmp.rows if r.method == p.method]
        assert p.speedup == (min(r.speedup for r in rows), max(r.speedup for r in rows))
        assert not p.speedup_agrees and "disagrees" in p.verdict and "Why" in p.verdict
        assert p.to_json()["paper_figure1_speedup"] == PAPER["figure1_speedup"]
    # no MI210 + U55C in the grid: no paper check
    other = compare([LLAMA], ["seer"], [4096], [1], [System.of("H100-SXM", "U55C")])
    assert other.paper == []
    gains = cmp.overlap_gains()
    assert {g["method"] for g in gains} == {"dsa", "seer"} and all(
        g["max"] >= g["min"] for g in gains
    )


def test_sources_say_modeled_or_composite(tmp_path):
    import json

    assert figure_source(System.of("MI210", "U55C"))[0] == "modeled"
    data = BUILTIN["MI210"].to_json()
    data.update(name="my-gpu", source="measured")
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(data))
    source, basis = figure_source(System.of(str(path), "U55C"))
    assert source == "composite" and "my-gpu" in basis
    cmp = compare([LLAMA], ["seer"], [4096], [1], [System.of(str(path), "U55C")])
    assert cmp.rows[0].source == "composite"
    assert cmp.to_json()["sources"]["my-gpu + U55C"]["source"] == "composite"


def test_bad_inputs_are_named_errors():
    assert parse_tokens("4k") == 4096 and parse_tokens("1M") == 1 << 20 and parse_tokens(512) == 512
    assert parse_list("64k, 4k,4k", "contexts", parse_tokens) == [4096, 65536]
    with pytest.raises(InputError, match="contexts"):
        parse_tokens("lots")
    with pytest.raises(InputError, match="batches"):
        parse_list("1,x", "batches")
    with pytest.raises(InputError, match="batches"):
        parse_list("", "batches")
    with pytest.raises(InputError, match="method"):
        compare([LLAMA], ["nope"], [4096], [1], [System.of("MI210", "U55C")])
    with pytest.raises(InputError, match="objective"):
        compare([LLAMA], ["seer"], [4096], [1], [System.of("MI210", "U55C")], objective="cheap")
    with pytest.raises(InputError, match="card"):
        compare([LLAMA], ["seer"], [4096], [1], [System.of("MI210", None)])
    with pytest.raises(ProfileError, match="unknown device"):
        systems_of(["MI999"], ["U55C"])
    with pytest.raises(ProfileError, match="link"):
        systems_of(["MI210"], ["U55C"], "pcie9")
    with pytest.raises(InputError, match="card"):
        systems_of(["MI210", "H200", "H100-SXM"], ["U55C", "U280"])
    assert [s.label for s in systems_of(["MI210", "H200"], ["U280"])] == [
        "MI210 + U280",
        "H200 + U280",
    ]
    assert len(systems_of(None, None)) == 3
