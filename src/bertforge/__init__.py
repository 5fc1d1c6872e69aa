"""bertforge: train BERT-style encoders from scratch and put them to work.

The public Python API is `load(path_or_hub_id) -> Model` (see `bertforge.api`); it is imported on
first use, so `import bertforge` (and `bertforge --help`) stays free of torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bertforge._version import __version__

__all__ = ["Model", "__version__", "load"]

if TYPE_CHECKING:
    from bertforge.api import Model, load


def __getattr__(name: str):
    if name in ("load", "Model"):
        from bertforge import api

        return getattr(api, name)
    raise AttributeError(f"module 'bertforge' has no attribute {name!r}")
