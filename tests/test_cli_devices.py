"""`hetmem devices`: the targets found and which xclbins of the manifest are present."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

from hetmem import cli
from hetmem.fpga.manifest import Manifest, expected_entry, sha256_file


@pytest.fixture
def run(capsys, monkeypatch):
    monkeypatch.setattr(cli.console, "width", 240)

    def _run(*argv):
        code = cli.main(list(argv))
        return code, capsys.readouterr().out

    return _run


def row(out, first):
    return next(line for line in out.splitlines() if line.strip("│┃ ").startswith(first))


def test_devices_lists_targets_and_the_missing_xclbin(run, monkeypatch, tmp_path):
    monkeypatch.setenv("HETMEM_XCLBIN_PATH", str(tmp_path))
    code, out = run("devices")
    assert code == 0
    assert "yes" in row(out, "emu ") and "yes" in row(out, "xrt_emu")
    assert "xilinx_u55c_gen3x16_xdma_base_3" in row(out, "xrt_emu")
    if importlib.util.find_spec("pyxrt") is None:
        assert "no" in row(out, "xrt ") and "pyxrt does not import" in row(out, "xrt ")
    line = row(out, "hetmem_hw.xclbin")
    assert "xilinx_u55c_gen3x16_xdma_3_202210_1" in line and "missing" in line
    assert "token_indexer (rtl)" in line and "bm25 (hls)" in line


def test_devices_shows_a_present_xclbin_and_its_checksum(run, monkeypatch, tmp_path):
    builds = tmp_path / "builds"
    builds.mkdir()
    xclbin = builds / "hetmem_hw.xclbin"
    xclbin.write_bytes(b"built")
    monkeypatch.setenv("HETMEM_XCLBIN_PATH", str(builds))
    manifest = tmp_path / "manifest.json"
    Manifest({"hetmem_hw.xclbin": expected_entry()}).save(manifest)
    code, out = run("devices", "--manifest", str(manifest))
    assert code == 0
    line = row(out, "hetmem_hw.xclbin")
    assert "present" in line and "not recorded" in line
    entry = expected_entry()
    Manifest({entry.name: entry}).with_checksum(entry.name, sha256_file(xclbin)).save(manifest)
    assert "matches" in row(run("devices", "--manifest", str(manifest))[1], "hetmem_hw")
    xclbin.write_bytes(b"rebuilt")
    assert "MISMATCH" in row(run("devices", "--manifest", str(manifest))[1], "hetmem_hw")


def test_devices_with_a_missing_manifest_is_an_error(run, tmp_path):
    code, out = run("devices", "--manifest", str(tmp_path / "nope.json"))
    assert code == 2 and "no bitstream manifest" in out


def test_devices_flags_a_bank_map_that_disagrees_with_the_kernel_specs(run, tmp_path):
    entry = expected_entry()
    kernels = {k: dict(v) for k, v in entry.kernels.items()}
    kernels["bm25"]["impacts"] = 31
    del kernels["vector_search"]["segs"]
    bad = dataclasses.replace(entry, kernels=kernels)
    manifest = tmp_path / "manifest.json"
    Manifest({bad.name: bad}).save(manifest)
    code, out = run("devices", "--manifest", str(manifest))
    assert code == 1
    assert "DISAGREES" in row(out, "hetmem_hw.xclbin")
    text = " ".join(out.split())
    assert "bm25.impacts in HBM[31], spec HBM[20]" in text
    assert "vector_search.segs missing (spec: HBM[17])" in text
    Manifest({entry.name: entry}).save(manifest)  # as the specs: no flag
    code, out = run("devices", "--manifest", str(manifest))
    assert code == 0 and "as the kernel specs" in row(out, "hetmem_hw.xclbin")
    assert bad.spec_mismatches() and not entry.spec_mismatches()
