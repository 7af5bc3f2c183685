"""CT physics: scanner parameters, projector and FBP, low-dose simulation."""

from training.ct.operators import CTOperator, default_device
from training.ct.params import KERNEL_ALIASES, KERNELS, ScanParams, resolve_kernel
from training.ct.simulator import LowDoseSimulator, SimResult

__all__ = [
    "KERNELS",
    "KERNEL_ALIASES",
    "CTOperator",
    "LowDoseSimulator",
    "ScanParams",
    "SimResult",
    "default_device",
    "resolve_kernel",
]
