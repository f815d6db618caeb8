import numpy as np
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
