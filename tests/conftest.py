import warnings

import pytest
import torch

from tree_guard import Guard


@pytest.fixture(autouse=True)
def _quiet_cpu_fallback():
    """The once-per-process 'no GPU, running on CPU' warning is tested on its own."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="hetmem: no CUDA or ROCm GPU found")
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def no_xrt_faults():
    """No fault injected into the emulated XRT runtime before or after a test (the fault
    and FPGA-driver tests take it: `pytestmark = pytest.mark.usefixtures("no_xrt_faults")`)."""
    from hetmem.fpga import xrt_emu

    xrt_emu.clear()
    yield
    xrt_emu.clear()


# -- Tests never write into the repository tree (tests/tree_guard.py) ----------------------------

_TREE = Guard()


def pytest_configure(config: pytest.Config) -> None:
    _TREE.install_hook()


def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the xdist controller, or the one process
        _TREE.start()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):
        _TREE.on = False
        return
    if _TREE.finish() and Guard.strict():
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    if _TREE.changes:
        verdict = "failed (CI or HETMEM_STRICT_TREE)" if Guard.strict() else "reported"
        terminalreporter.section(f"tracked files changed during the session: {verdict}")
        for path in _TREE.changes:
            terminalreporter.write_line(f"  {path}")
        terminalreporter.write_line(
            "tests write under tmp_path; bench/ scripts own bench/results. In a shared "
            "working tree, someone else may have saved these meanwhile."
        )
