"""The yosys resource report: cell counting and the U55C table."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("fpga_synth", ROOT / "fpga" / "synth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cells_map_to_resources():
    synth = load()
    res = synth.count(
        {
            "LUT6": 10,
            "LUT2": 5,
            "RAM64M": 2,
            "FDRE": 30,
            "FDSE": 2,
            "DSP48E2": 4,
            "RAMB36E2": 3,
            "RAMB18E2": 2,
            "URAM288": 1,
            "CARRY8": 7,
        }
    )
    assert res == {"LUT": 23, "FF": 32, "DSP": 4, "BRAM36": 4, "URAM": 1}


def test_table_shows_device_and_slr_shares():
    synth = load()
    text = synth.table({"engine": {"LUT": 43456, "FF": 0, "DSP": 3008, "BRAM36": 0, "URAM": 0}})
    row = text.splitlines()[-1]
    assert row.startswith("| engine |")
    assert "3,008 (33.33% / 100.00%)" in row  # a third of the device is one whole SLR


def test_lutram_cells_count_their_luts():
    synth = load()
    # UG574: a RAM256X1D fills a SLICEM (8 LUTs), a RAM64X1D two LUTs, a RAM64X1S one
    res = synth.count({"RAM256X1D": 3, "RAM64X1D": 5, "RAM64X1S": 7, "RAM128X1S": 1})
    assert res["LUT"] == 3 * 8 + 5 * 2 + 7 + 2


def test_stat_json_with_hierarchy_lines(tmp_path):
    synth = load()
    # yosys 0.23 interleaves the hierarchy as text rows in `stat -json -top` output
    path = tmp_path / "top.json"
    path.write_text(
        '{\n   "modules": {\n      "a": {"num_cells": 1}\n   },\n'
        "       $paramod$ab12\\hm_ram     64\n"
        "       $paramod\\hm_fifo      1\n"
        '      "design": {"num_cells_by_type": {"URAM288": 128, "LUT6": 3}}\n}\n'
    )
    stat = synth.load_stat(path)
    assert synth.count(stat["design"]["num_cells_by_type"])["URAM"] == 128
