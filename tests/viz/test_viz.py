import numpy as np
import pytest
from PIL import Image

from moon.viz import overlay_heatmap, plot_embedding_map, plot_routing_map, project_2d, retrieval_gallery_html
from moon.viz.gallery import GalleryRow


def test_pca_projection_separates_two_clusters():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.1, (20, 16)) + 5
    b = rng.normal(0, 0.1, (20, 16)) - 5
    xy = project_2d(np.vstack([a, b]), method="pca")
    assert xy.shape == (40, 2)
    assert np.sign(xy[:20, 0]).tolist() == [np.sign(xy[0, 0])] * 20
    assert np.sign(xy[20:, 0]).tolist() == [-np.sign(xy[0, 0])] * 20


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(1)
    out = plot_embedding_map(rng.normal(size=(30, 8)), ["a"] * 15 + ["b"] * 15, tmp_path / "m.png", method="tsne")
    assert Image.open(out).size[0] > 100
    counts = {"layer 0": np.array([[5, 1], [0, 4]]), "layer 1": np.array([[3, 3], [0, 0]])}
    out = plot_routing_map(counts, ["vision", "title"], ["shared", "vision"], tmp_path / "r.png")
    assert Image.open(out).size[0] > 100


def test_overlay_keeps_size_and_marks_hot_region():
    img = Image.new("RGB", (64, 32), (128, 128, 128))
    heat = np.zeros((4, 8))
    heat[0, 0] = 1.0
    out = overlay_heatmap(img, heat, alpha=0.6)
    assert out.size == (64, 32)
    hot, cold = np.asarray(out)[2, 2], np.asarray(out)[30, 60]
    assert hot[0] > cold[0]  # jet: hot is red, cold is blue


def test_gallery_marks_hits_and_escapes_titles(tmp_path):
    p = tmp_path / "x.png"
    Image.new("RGB", (20, 20), (0, 0, 255)).save(p)
    html = retrieval_gallery_html(
        [GalleryRow("red <shoe>", p, "q1", [(p, "A & B", 0.9, True), (None, "C", 0.5, False)])]
    )
    assert html.count("card hit") == 1 and "&lt;shoe&gt;" in html and "A &amp; B" in html
    assert "data:image/jpeg;base64," in html


def test_fit_y_scales_to_the_data_and_goes_log_over_a_wide_span():
    from moon.viz import fit_y

    near_zero = fit_y([0.0, 0.01, 0.02, 0.9])
    assert near_zero.kind == "log" and near_zero.bottom == 0.005 and near_zero.top == 1.05
    assert near_zero.place([0.0, 0.5]) == [0.005, 0.5]  # a 0 sits on the bottom edge, drawable
    low = fit_y([0.02, 0.04, 0.05])
    assert low.kind == "linear" and (low.bottom, low.top) == (0.0, pytest.approx(0.0625))
    assert fit_y([0.0, float("nan")]).top == 0.05
    assert fit_y([0.01, 0.9], log=False).kind == "linear"


def test_legend_below_covers_no_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moon.viz import legend_below

    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4), squeeze=False)
    for ax in axes[0]:
        for i in range(5):
            ax.plot([1, 5, 10], [1.0, 1.0, 1.0 - 0.01 * i], label=f"model {i} with a long name")  # lines at the top
    legend = legend_below(fig, *axes[0][0].get_legend_handles_labels())
    fig.canvas.draw()
    box = legend.get_window_extent()
    for ax in axes[0]:
        assert not box.overlaps(ax.get_tightbbox(fig.canvas.get_renderer()))
    assert box.y0 >= 0  # inside the figure
    plt.close(fig)


def test_heatmaps_share_one_colour_scale_with_a_colour_bar(tmp_path):
    from moon.viz import plot_heatmaps

    img = Image.new("RGB", (64, 64), (128, 128, 128))
    cold = np.zeros((4, 4))
    hot = np.ones((4, 4))
    out = plot_heatmaps([(img, cold, "cold"), (img, hot, "hot")], tmp_path / "h.png", cols=2)
    px = np.asarray(Image.open(out).convert("RGB")).astype(int)
    # the colour bar: a column right of the panels running from red (top) to blue (bottom)
    strip = px[:, int(px.shape[1] * 0.925)]
    assert any(r > 150 and b < 100 for r, _, b in strip) and any(b > 150 and r < 100 for r, _, b in strip)
    h, w = px.shape[:2]
    left = px[h // 2, int(w * 0.2)]
    right = px[h // 2, int(w * 0.6)]
    assert left[2] > left[0] and right[0] > right[2]  # a 0 map stays blue, a 1 map red: no per-image stretch
    with pytest.raises(ValueError):
        plot_heatmaps([], tmp_path / "none.png")


def test_gallery_shows_the_purchased_product_and_a_note(tmp_path):
    p = tmp_path / "x.png"
    Image.new("RGB", (20, 20), (0, 0, 255)).save(p)
    row = GalleryRow(
        "red shoe", None, "q1", [(p, "A", None, False)], purchased=[(p, "B", "rank 37")], note="same top 5"
    )
    html = retrieval_gallery_html([row])
    assert "card bought" in html and "purchased · rank 37" in html and "same top 5" in html and "card hit" not in html


def test_heatmap_titles_in_chinese_find_a_font(tmp_path):
    import warnings

    from moon.viz import plot_heatmaps
    from moon.viz.axes import text_fonts

    if len(text_fonts()) < 2:
        pytest.skip("no CJK font installed (fonts-wqy-zenhei)")
    img = Image.new("RGB", (32, 32), (128, 128, 128))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_heatmaps([(img, np.zeros((2, 2)), "爆款 sporty purple mallet")], tmp_path / "h.png")
    assert not [w for w in caught if "Glyph" in str(w.message)]
