"""Files in and out (utils.py): run folders, image formats and bit depths, metrics on the fixed [0, 1] range, PSF-grid files."""

import io
import threading

import numpy as np
import pytest
from PIL import Image

import utils
from helpers import Payload, bomb_png, npy_header_only, run_dirs


def test_make_run_dir_is_unique_under_contention(tmp_path):
    made = []
    threads = [threading.Thread(target=lambda: made.append(utils.make_run_dir(str(tmp_path)))) for _ in range(16)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(set(made)) == 16 and len(run_dirs(tmp_path)) == 16


def test_image_formats_gray_rgba_16bit(tmp_path):
    rgb = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.png")
    Image.fromarray(np.dstack([rgb, np.full((20, 30), 7, np.uint8)])).save(tmp_path / "a.png")
    yy, xx = np.mgrid[0:20, 0:30]
    smooth = np.dstack([xx * 8, yy * 12, xx * 4 + yy * 4]).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "c.jpg", quality=95)
    import tifffile
    tifffile.imwrite(tmp_path / "d.tif", (rgb.astype(np.uint16) * 257))
    g = utils.read_image(str(tmp_path / "g.png"))
    assert g.shape == (20, 30, 1) and np.allclose(g[..., 0], rgb[..., 0] / 255)  # gray stays gray
    a = utils.read_image(str(tmp_path / "a.png"))
    assert a.shape == (20, 30, 3) and np.allclose(a, rgb / 255)
    d = utils.read_image(str(tmp_path / "d.tif"))
    assert np.allclose(d, rgb / 255)  # 16-bit scaled by 65535
    c = utils.read_image(str(tmp_path / "c.jpg"))
    assert c.shape == (20, 30, 3) and np.abs(c - smooth / 255).mean() < 0.02
    out = utils.center_crop_resize(a, 16)
    assert out.shape == (16, 16, 3) and out.min() >= 0 and out.max() <= 1


def test_metrics_use_fixed_range():
    ref = np.full((16, 16, 3), 0.5)
    est = ref + 0.1
    assert abs(utils.psnr(ref, est) - 20.0) < 1e-9  # MSE 0.01 on a [0, 1] range: exactly 20 dB
    assert abs(utils.psnr(ref * 0.1, est * 0.1) - 40.0) < 1e-9  # no per-image rescaling


@pytest.mark.parametrize("shape", [(256, 256, 4001, 4001), (10 ** 11,), (300, 300, 3, 3)])
def test_absurd_psf_grid_refused_without_allocating(tmp_path, monkeypatch, shape):
    path = npy_header_only(tmp_path / "psfs.npy", shape)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load was called"))
    with pytest.raises(utils.UserError, match="beyond the limits"):
        utils.load_psf_grid(str(path))


def test_absurd_psf_grid_in_npz_refused(tmp_path):
    inner = io.BytesIO()
    np.lib.format.write_array_header_1_0(inner, {"descr": "<f8", "fortran_order": False, "shape": (64, 64, 255, 255)})
    import zipfile
    with zipfile.ZipFile(tmp_path / "g.npz", "w") as z:
        z.writestr("psfs.npy", inner.getvalue())
    with pytest.raises(utils.UserError, match="beyond the limits"):
        utils.load_psf_grid(str(tmp_path / "g.npz"))


def test_pickled_object_array_in_psf_grid_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    np.save(tmp_path / "g.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(utils.UserError, match="must hold numbers"):
        utils.load_psf_grid(str(tmp_path / "g.npy"))
    assert not marker.exists()


def test_text_npy_is_named_not_an_array(tmp_path):
    (tmp_path / "g.npy").write_text("0 1 2\n3 4 5\n")
    with pytest.raises(utils.UserError, match="not a valid .npy array") as ei:
        utils.load_psf_grid(str(tmp_path / "g.npy"))
    assert "allow_pickle" not in str(ei.value)


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    bomb = bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 5000
    import imageio.v3 as iio

    def no_decode(*a, **k):
        raise AssertionError("the image was decoded")
    monkeypatch.setattr(iio, "imread", no_decode)
    with pytest.raises(utils.UserError, match="declares 10,000,000,000 pixels"):
        utils.read_image(str(bomb))
    with pytest.raises(utils.UserError, match="refusing to decode"):
        utils.decode_image(bomb.read_bytes(), "http://host/bomb.png")  # what a URL delivers
    # An image under the limit still goes through the same check and decodes.
    ok = bomb_png(tmp_path / "ok.png", 40, 30)
    monkeypatch.undo()
    assert utils.read_image(str(ok)).shape == (30, 40, 1)


def test_an_alpha_channel_is_dropped_with_a_word(caplog):
    rgba = np.ones((4, 5, 4))
    with caplog.at_level("INFO", logger="eigenpsf_dps"):
        x = utils.to_float_image(rgba, "opaque.png")
        rgba[0, :2, 3] = 0.5
        utils.to_float_image(rgba, "cutout.png")
    assert x.shape == (4, 5, 3)
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said == [("INFO", "opaque.png: alpha channel dropped (fully opaque)"),
                    ("WARNING", "cutout.png: alpha channel dropped; 10.0% of the pixels were not opaque, and their "
                                "colour is restored as it is stored")]
