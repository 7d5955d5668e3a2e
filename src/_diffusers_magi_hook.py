"""Lets Diffusers find the diffusers-magi classes in a process that never imported `diffusers_magi`.

`DiffusionPipeline.from_pretrained(folder)` looks the folder's `_class_name` (e.g. `MagiPipeline`) up as an attribute
of the `diffusers` module, which knows nothing of third-party packages until they are imported. The installed
`diffusers_magi.pth` imports this module when Python starts. It imports nothing itself: it waits on `sys.meta_path`
for `diffusers` to be imported, then gives Diffusers' lazy module a fallback that imports `diffusers_magi` (which
registers its classes with Diffusers, see `diffusers_magi/_registration.py`) the first time one of these names is
looked up. A process that never asks for a MAGI-1 class never imports `diffusers_magi`.
"""

import importlib.abc
import importlib.util
import sys

# `diffusers_magi.__all__` (tests/test_first_contact.py checks that they agree).
CLASS_NAMES = frozenset(
    {
        "AutoencoderMagi",
        "MagiAutoBlocks",
        "MagiChunkOutput",
        "MagiChunkScheduler",
        "MagiGuidance",
        "MagiImageToVideoPipeline",
        "MagiKVCache",
        "MagiModularPipeline",
        "MagiPipeline",
        "MagiPipelineOutput",
        "MagiSession",
        "MagiSessionInterrupted",
        "MagiSessionProgress",
        "MagiTransformer3DModel",
        "MagiVideoToVideoPipeline",
    }
)


class _ObjectsWithMagiFallback(dict):
    """The extra objects of Diffusers' lazy module, and the diffusers-magi class names resolved on first use."""

    def __contains__(self, name):
        return dict.__contains__(self, name) or name in CLASS_NAMES

    def __getitem__(self, name):
        if name in CLASS_NAMES and not dict.__contains__(self, name):
            import diffusers_magi

            return getattr(diffusers_magi, name)
        return dict.__getitem__(self, name)


def _add_fallback(diffusers_module) -> None:
    objects = getattr(diffusers_module, "_objects", None)
    if isinstance(objects, dict) and not isinstance(objects, _ObjectsWithMagiFallback):
        diffusers_module._objects = _ObjectsWithMagiFallback(objects)


class _DiffusersImportWatcher(importlib.abc.MetaPathFinder):
    """Finds `diffusers` like the other finders do, and adds the fallback once its `__init__` has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "diffusers":
            return None
        sys.meta_path.remove(self)  # one import of diffusers per process; the other finders locate it
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            _add_fallback(sys.modules.get(fullname, module))  # Diffusers replaces itself by a lazy module

        spec.loader.exec_module = exec_module
        return spec


if "diffusers" in sys.modules:
    _add_fallback(sys.modules["diffusers"])
else:
    sys.meta_path.insert(0, _DiffusersImportWatcher())
