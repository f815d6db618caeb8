"""The offline product world: an MBE-like catalogue, listings, queries and purchases made from
real offline sources (openclipart drawings, Fashion-MNIST photos, real background photos).

``synthesize(out_dir, n_products=2000, seed=0)`` writes a product store (deterministic for a seed);
``write_gallery(store_dir, out_file)`` writes an HTML page or PNG contact sheet to look at it.
Numpy and PIL only: no torch here. See ``docs/world.md``.
"""

from moon.world.gallery import write_gallery
from moon.world.sources import WorldSourceError
from moon.world.synth import PROFILES, Profile, WorldParams, assign_split_modality, synthesize

__all__ = [
    "PROFILES",
    "Profile",
    "WorldParams",
    "WorldSourceError",
    "assign_split_modality",
    "synthesize",
    "write_gallery",
]
