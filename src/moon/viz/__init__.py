"""Pictures people would rather look at than read: embedding maps, retrieval galleries, MoE routing
maps and image heat-maps. Pure functions from arrays/records to PNG or HTML; matplotlib (Agg)."""

from moon.viz.axes import YScale, fit_y, legend_below
from moon.viz.embedding_map import plot_embedding_map, project_2d
from moon.viz.gallery import retrieval_gallery_html, thumbnail_data_uri
from moon.viz.heatmap import overlay_heatmap, plot_heatmaps
from moon.viz.routing import plot_routing_map

__all__ = [
    "YScale",
    "fit_y",
    "legend_below",
    "overlay_heatmap",
    "plot_heatmaps",
    "plot_embedding_map",
    "plot_routing_map",
    "project_2d",
    "retrieval_gallery_html",
    "thumbnail_data_uri",
]
