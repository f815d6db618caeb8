"""The gallery (HTML and PNG) and the `moon data synth` / `moon data gallery` commands."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from moon.cli import main
from moon.errors import ConfigError
from moon.world import write_gallery


def test_html_gallery_inlines_listings_and_queries(tiny_world, tmp_path):
    out = write_gallery(tiny_world.root, tmp_path / "g.html", n=5, n_queries=3)
    page = out.read_text(encoding="utf-8")
    assert page.count("class='row'") == 5 + 3
    assert len(re.findall(r"data:image/jpeg;base64,", page)) >= 5 * 3 + 3
    assert "Queries" in page and "query</b>" in page


def test_png_contact_sheet(tiny_world, tmp_path):
    out = write_gallery(tiny_world.root, tmp_path / "g.png", n=2, n_queries=2)
    with Image.open(out) as im:
        assert im.size[0] > 900 and im.size[1] >= 4 * 160


def test_gallery_refuses_other_formats(tiny_world, tmp_path):
    with pytest.raises(ConfigError, match=".html or .png"):
        write_gallery(tiny_world.root, tmp_path / "g.pdf")


def test_cli_synth_and_gallery(tmp_path, capsys):
    store = tmp_path / "s"
    main(["data", "synth", "--out", str(store), "--products", "3", "--seed", "2", "--quiet"])
    assert "3 products" in capsys.readouterr().out
    main(["data", "gallery", str(store), "--out", str(tmp_path / "g.html"), "--n", "2"])
    assert (tmp_path / "g.html").is_file()
    with pytest.raises(SystemExit) as exc:
        main(["data", "synth", "--out", str(store), "--products", "3", "--quiet"])
    assert exc.value.code == 2
    assert "already exists" in capsys.readouterr().err
