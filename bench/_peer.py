"""Import DeepInverse's SpaceVaryingBlur for the benchmark.

deepinv imports torchvision at package import time, but SpaceVaryingBlur itself needs only torch.
Where torchvision is missing or broken (e.g. a CPU-only torch without a matching torchvision
wheel), placeholder `torchvision.*` modules are installed *before* importing deepinv so that its
package imports succeed; nothing of torchvision is used by the code being timed.
"""

import importlib.abc
import importlib.machinery
import sys
import types


class _Anything:
    """Stands in for any torchvision attribute touched at deepinv import time."""

    def __init__(self, *a, **k):
        pass

    def __getattr__(self, name):
        return _Anything()

    def __call__(self, *a, **k):
        return _Anything()

    def __mro_entries__(self, bases):
        return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _StubModule(spec.name)
        m.__path__ = []
        m.__version__ = "0.0-placeholder"
        return m

    def exec_module(self, module):
        pass


def import_space_varying_blur():
    """Returns (SpaceVaryingBlur, note) where note says whether torchvision was stubbed."""
    note = "torchvision available"
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _StubFinder())
        note = "torchvision unusable here: placeholder modules let deepinv import (SpaceVaryingBlur needs only torch)"
    from deepinv.physics.blur import SpaceVaryingBlur
    return SpaceVaryingBlur, note
