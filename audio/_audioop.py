"""The one place that imports ``audioop``.

``audioop`` is in the standard library up to Python 3.12; from 3.13 the ``audioop-lts``
distribution provides the same module (same C code), declared in ``pyproject.toml`` with an
environment marker. Python 3.11/3.12 print a DeprecationWarning on import, which is silenced here
because the module is the intended, maintained choice on those versions.
"""

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = ["audioop"]
