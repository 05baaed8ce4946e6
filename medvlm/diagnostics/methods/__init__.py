"""The saliency methods, one file each (see :mod:`medvlm.diagnostics.methods.base`).

Every module of this package is imported here, so its :func:`register`-decorated method joins the
registry: adding a method is adding one file.
"""

import importlib
import pkgutil

from medvlm.diagnostics.methods.base import (  # noqa: F401 - the registry's public names
    Context,
    Method,
    MethodResult,
    Shape,
    get_method,
    method_names,
    register,
    registered,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
