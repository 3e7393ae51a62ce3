"""Which model pieces get which fused module: ``patch``, ``unpatch`` and ``report``."""

from peftfast.patching.core import PatchReport, patch, report, unpatch

__all__ = ["PatchReport", "patch", "report", "unpatch"]
