"""The image-hash cache is only a cache: a failed save (a full disk) warns and loses nothing else."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from PIL import Image

from moon.train.catalog import ImageHashCache


def test_a_full_disk_while_saving_the_cache_warns_keeps_the_old_file_and_goes_on(tmp_path, monkeypatch):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(image)
    path = tmp_path / "image-hashes.json"
    path.write_text(json.dumps({}), encoding="utf-8")
    cache = ImageHashCache(path)
    digest = cache.sha1(image)
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.suffix == ".tmp":
            real(self, "{", encoding="utf-8")  # part of it written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.warns(RuntimeWarning, match="could not save the image-hash cache.*No space left"):
        cache.save()
    assert json.loads(path.read_text(encoding="utf-8")) == {}  # the old file, whole
    assert not path.with_suffix(".tmp").exists()
    assert cache.sha1(image) == digest  # the cache in memory still works
    monkeypatch.setattr(Path, "write_text", real)
    cache._dirty = True
    cache.save()  # once there is room again, it is saved
    assert digest in json.loads(path.read_text(encoding="utf-8")).values()
