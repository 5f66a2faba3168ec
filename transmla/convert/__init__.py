"""Conversion of a grouped-query attention checkpoint into latent attention.

`options` (every setting, default and check) -> `pipeline` (the driver) -> `stream` (the layer loop, with
`budget` for the sizes and `calibration` for the layer-by-layer statistics) -> `recipe` (one layer: `rope`, the
method's factorisation from `methods` (`latent` / `whiten`), `assemble`) over `attention` (the source layer, read
through its family: `transmla.families`) and `statistics` (what is known of its inputs).
"""

from .options import ConvertOptions
from .pipeline import convert

__all__ = ["ConvertOptions", "convert"]
