"""Optional dependencies (transformers, accelerate, bitsandbytes, ray, matplotlib): imported
where they are used, or a one-line error with the pip command that installs them. Ground floor:
imports only `errors`."""

from __future__ import annotations

import importlib
from typing import Any

from lazymerge.errors import MissingDependencyError


def require(module: str, extra: str = "eval") -> Any:
    """Import an optional dependency or fail with the pip command that installs it.

    Raises:
        MissingDependencyError naming the module and the extra (`pip install 'lazymerge[EXTRA]'`).
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"{module} is not installed; run: pip install 'lazymerge[{extra}]'"
        ) from None
