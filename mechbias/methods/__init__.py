"""Methods layer: one module or package per method, each registered with ``@register_method``.

Importing this package imports every method, which registers it; the CLI and
the study read the registry. A new method is one module here plus one line
below (see docs/architecture.md).
"""

# registration: one line per method
from . import (
    gradiend,  # noqa: F401
    ig2,  # noqa: F401
    leace,  # noqa: F401
    patching,  # noqa: F401
    pruning,  # noqa: F401
    steering,  # noqa: F401
)
