"""How the case generators (gen_loss_cases.py, gen_point_cases.py) import MMDetection 3.3:
the installed wheel's modules unmodified, with stand-ins only for the compiled `mmcv.ops`
(stubs that record and raise if they are called) and bare packages for `mmdet.models` and the
subpackages named, so that their `__init__` (which imports every model and mmcv.ops) does not
run. `CALLED` lists the stubs that were called; a generator asserts it stays empty.
"""
import importlib
import importlib.abc
import importlib.machinery
import sys
import types

CALLED = []


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def stub(*a, **k):
            CALLED.append(f"{self.__name__}.{name}")
            raise RuntimeError(f"stub {self.__name__}.{name} called")

        return stub


class _OpsFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "mmcv.ops" or name.startswith("mmcv.ops."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _StubModule(spec.name)
        m.__path__ = []
        return m

    def exec_module(self, module):
        pass


def import_mmdet(bare_packages):
    """Imports mmdet (its version checks run), makes each of `bare_packages` a bare package
    over its directory, and imports `mmdet.models.task_modules` and `mmdet.models.utils`."""
    sys.meta_path.insert(0, _OpsFinder())
    import mmdet

    for bare in bare_packages:
        pkg = types.ModuleType(bare)
        pkg.__path__ = [mmdet.__path__[0] + "/" + bare.split(".", 1)[1].replace(".", "/")]
        sys.modules[bare] = pkg
    importlib.import_module("mmdet.models.task_modules")
    importlib.import_module("mmdet.models.utils")
    return mmdet
