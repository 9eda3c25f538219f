"""Methods layer: one module or package per method, each registered with ``@register_method``.

Importing this package imports every method, which registers it; the CLI and
the study read the registry. A new method is one module here plus one line
below (see docs/architecture.md).
"""

# registration: one line per method, in the order the study runs them and reports list them
from . import ig2  # noqa: F401
from . import patching  # noqa: F401
from . import pruning  # noqa: F401
from . import gradiend  # noqa: F401
from . import steering  # noqa: F401
from . import leace  # noqa: F401
