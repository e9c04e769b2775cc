"""soda.outputs: unwritable places refused up front; atomic writes leave the old file or nothing."""
import errno

import pytest

from soda.errors import UserError
from soda.outputs import atomic_output, check_writable, write_json_atomic


def test_failure_while_writing_leaves_the_old_file_and_no_temporary(tmp_path):
    p = tmp_path / "a.json"
    p.write_text("old")
    with pytest.raises(OSError):
        with atomic_output(p) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert p.read_text() == "old" and [q.name for q in tmp_path.iterdir()] == ["a.json"]


def test_two_writers_of_one_path_get_their_own_temporary_file(tmp_path):
    p = tmp_path / "a.json"
    with atomic_output(p) as a, atomic_output(p) as b:
        assert a != b and a.parent == b.parent == tmp_path and a.suffix == b.suffix == ".json"
        a.write_text("A")
        b.write_text("B")
    assert p.read_text() == "A"  # the outer writer finished last
    write_json_atomic(p, {"format": 1})
    assert p.read_text() == '{\n "format": 1\n}' and [q.name for q in tmp_path.iterdir()] == ["a.json"]
    assert oct(p.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_check_writable(tmp_path):
    (tmp_path / "f").write_text("x")
    # folders are made later; the outermost missing one is returned, so the CLI can say so
    assert check_writable(tmp_path / "new" / "deeper" / "x.png", "--out") == tmp_path / "new"
    assert check_writable(tmp_path / "eng", "--out", folder=True) == tmp_path / "eng"
    assert check_writable(tmp_path / "x.png", "--out") is None
    assert check_writable(tmp_path, "--out", folder=True) is None
    with pytest.raises(UserError, match="f is a file, not a folder"):
        check_writable(tmp_path / "f" / "x.png", "--out")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_writable(tmp_path / "f", "--out", folder=True)
    with pytest.raises(UserError, match="is a folder; give a file name"):
        check_writable(tmp_path, "--out")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["f"]  # the probe file is gone


def test_random_weights_title_fits_a_two_image_grid(tmp_path):
    """The title used to be cut off at the grid's width ("RANDOM WEI..." on 2 images)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from soda.models.config import get_config
    from soda.pictures import save_samples_png

    save_samples_png(np.zeros((2, 1, 16, 16), np.float32), np.array([1, 2]), tmp_path / "s.png",
                     get_config("dit-digits"), random_init=True)
    title = "dit-digits pixels RANDOM WEIGHTS"
    with Image.open(tmp_path / "s.png") as im:
        band = np.asarray(im.convert("L"))[:14]
    need = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title)
    ink = np.nonzero((band < 128).any(axis=0))[0]
    assert band.shape[1] >= need + 8 and ink.max() < band.shape[1] - 2  # the last letter ends inside the image


def test_every_picture_of_random_weights_says_so():
    from soda.plots import random_note

    assert random_note("random-init-0") == " - RANDOM WEIGHTS"
    assert random_note("3f2a" * 16) == "" and random_note(None) == ""
