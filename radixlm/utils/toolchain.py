"""Whether radixlm's C kernels (``radixlm.kernels.cpu``) may be built here, judged without compiling anything.

``ServerArgs`` resolves ``--attention-backend auto`` with this, and the kernels find their compiler through it,
so both agree on which compiler is meant.  The build itself happens on the kernels' first use.
"""

from __future__ import annotations

import os
import shutil

DISABLE_ENV = "RADIXLM_DISABLE_CPU_KERNELS"


def cpu_kernels_disabled() -> bool:
    """The user turned the C kernels off (``RADIXLM_DISABLE_CPU_KERNELS=1``)."""
    return os.environ.get(DISABLE_ENV) == "1"


def find_c_compiler() -> str | None:
    """The C compiler's executable: ``$CC`` when set, else ``cc`` or ``gcc`` on ``PATH``; None when there is none.

    Only the file system is searched: the compiler is not run, so a broken one is found all the same.
    """
    requested = os.environ.get("CC")
    if requested:
        return shutil.which(requested)
    return shutil.which("cc") or shutil.which("gcc")


def cpu_kernels_buildable() -> bool:
    """Not disabled and a compiler found: the kernels should build (the build can still fail; then the layers
    run their torch code and the error is logged)."""
    return not cpu_kernels_disabled() and find_c_compiler() is not None
