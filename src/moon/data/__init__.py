"""Products, queries, purchases and images: the records, the on-disk store and safe image loading.

Nothing here knows about torch modules (the data layer sits at the start of the one-way flow
data → regions → model → train / bench / index → serve).
"""

from moon.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, image_sha1, load_image
from moon.data.records import (
    SPLITS,
    Box,
    Product,
    Purchase,
    Query,
    as_dict,
    box_iou,
    product_text,
)
from moon.data.store import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ProductStore,
    StoreError,
    StoreWriter,
    ValidationReport,
    write_store,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SPLITS",
    "Box",
    "ImageLoadError",
    "Product",
    "ProductStore",
    "Purchase",
    "Query",
    "StoreError",
    "StoreWriter",
    "ValidationReport",
    "as_dict",
    "box_iou",
    "image_sha1",
    "load_image",
    "product_text",
    "write_store",
]
