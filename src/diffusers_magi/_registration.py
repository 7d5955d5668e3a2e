"""Make the classes of this package resolvable by Diffusers' loaders.

Diffusers imports only the libraries it knows (``diffusers``, ``transformers``, ...) when it reads a
``model_index.json`` or a component config. A third-party library is resolved in two ways, both set up here:

* ``diffusers.pipelines.diffusers_magi`` points at this package: folders whose ``model_index.json`` names the
  library ``diffusers_magi`` then load their components through Diffusers' "pipeline module" branch, which also
  passes the Hub download check.
* every public class becomes an attribute of the ``diffusers`` module (unless Diffusers already has a class of that
  name), so ``_class_name`` lookups, ``AutoModel.from_pretrained`` and ``from diffusers import ...`` work.
"""

import sys


def register_with_diffusers() -> None:
    import diffusers
    import diffusers.pipelines

    package = sys.modules[__package__]
    setattr(diffusers.pipelines, "diffusers_magi", package)
    for name in package.__all__:
        if not hasattr(diffusers, name):
            setattr(diffusers, name, getattr(package, name))
