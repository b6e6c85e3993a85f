"""The system model: does GPU+FPGA pay off for this model, method, context, batch and
devices? Device profiles (cited), each step's bytes and FLOPs from the method's own
`costs(shape)`, the kernels' cycle models and the link model make a timeline per device for
each schedule (GPU alone, sequential offload, overlapped offload); energy is power x time
over it; the planner ranks every valid placement.

    from hetmem.system import System, Shape, get_model, schedule, schedule_energy, plan
    sys = System.of("MI210", "U55C")
    shape = Shape(get_model("Llama-3.1-8B"), context=131072, batch=16)
    gpu, off = schedule("quest", shape, sys, "gpu"), schedule("quest", shape, sys, "sequential")
    print(gpu.seconds / off.seconds, plan("quest", shape, sys).explain())

Every figure here is `modeled`, except profiles marked `measured` and `measure_energy`.
"""

from .costs import fpga_cycles, fpga_seconds, gpu_seconds, layer_costs, method_costs
from .devices import (
    BUILTIN,
    LINKS,
    DeviceProfile,
    Efficiency,
    Figure,
    Link,
    ProfileError,
    card_link,
    get_device,
    get_link,
    load_profile,
    register,
    save_profile,
)
from .energy import Energy, measure_energy, schedule_energy
from .planner import Candidate, Plan, auto_placement, placements, plan
from .schedule import SCHEDULES, Schedule, System, memory_share, schedule
from .shape import ConfigError, ModelConfig, Shape, StepCost, get_model, shipped_configs

__all__ = [
    "BUILTIN",
    "LINKS",
    "SCHEDULES",
    "Candidate",
    "ConfigError",
    "DeviceProfile",
    "Efficiency",
    "Energy",
    "Figure",
    "Link",
    "ModelConfig",
    "Plan",
    "ProfileError",
    "Schedule",
    "Shape",
    "StepCost",
    "System",
    "auto_placement",
    "card_link",
    "fpga_cycles",
    "fpga_seconds",
    "get_device",
    "get_link",
    "get_model",
    "gpu_seconds",
    "layer_costs",
    "load_profile",
    "measure_energy",
    "memory_share",
    "method_costs",
    "placements",
    "plan",
    "register",
    "save_profile",
    "schedule",
    "schedule_energy",
    "shipped_configs",
]
