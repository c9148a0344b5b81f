"""Images read the way users expect, one reader for xa-generate, the plugins and xa-serve:
16-bit grey scaled by its range (not clipped at 255), EXIF orientation applied (as diffusers'
load_image), and sizes bounded by pixel count and aspect ratio before any pixel is decoded."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from PIL import Image

from xa_runtime.errors import ParameterError
from xa_runtime.loading.images import MAX_IMAGE_ASPECT, image_to_tensor, read_image
from xa_runtime.plugins.control_images import control_image_tensor

RAMP = (np.arange(64 * 256).reshape(64, 256) * 4).astype(np.uint16)  # 0 .. 65532 across the image


def png16(path):
    Image.fromarray(RAMP).save(path)  # mode I;16: a 16-bit grey PNG
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    return path


def test_a_16_bit_control_image_keeps_its_ramp(tmp_path):
    pixels = control_image_tensor(png16(tmp_path / "ramp16.png"), "none", 64, 256, 1)
    expected = RAMP.astype(np.float64) / 65535  # the independent reference: the file's values over their range
    assert np.abs(pixels[0, 0].numpy() - expected).max() <= 0.5 / 255 + 1e-6
    assert float((pixels >= 1.0).float().mean()) < 0.01  # was 99.6% saturated


def test_a_16_bit_pil_image_handed_in_is_scaled_too():
    t = image_to_tensor(Image.fromarray(RAMP), 64, 256, 1)
    assert np.abs(t[0, 1].numpy() - RAMP / 65535).max() <= 0.5 / 255 + 1e-6


def oriented(path, fmt: str):
    """A 6 x 4 image, red left / blue right, stored with EXIF orientation 6 (view rotated 90 deg clockwise)."""
    a = np.zeros((4, 6, 3), np.uint8)
    a[:, :3, 0], a[:, 3:, 2] = 255, 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(path, format=fmt, exif=exif.tobytes(), **({"quality": 100} if fmt == "JPEG" else {}))
    return path, Image.fromarray(a).transpose(Image.Transpose.ROTATE_270)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied_to_control_and_init_images(fmt, tmp_path):
    from xa_runtime.cli.plugin_args import load_init_image
    from xa_runtime.plugins.control_images import open_image

    path, expected = oriented(tmp_path / f"o.{fmt.lower()}", fmt)
    for image in (open_image(str(path)), load_init_image(str(path))):
        assert image.size == (4, 6)
        ends = [0, -1]  # the rows away from the colour edge, which JPEG's chroma subsampling blurs
        assert np.abs(np.asarray(image, np.int16)[ends] - np.asarray(expected, np.int16)[ends]).max() <= 8


def extreme(path, width=16_777_216, height=1):
    Image.new("L", (width, height)).save(path)  # a ~49 KB PNG within the pixel limit
    return path


def test_an_ip_image_of_extreme_aspect_is_refused_by_the_cli_check(tmp_path):
    from xa_runtime.cli.plugin_args import _image

    path = extreme(tmp_path / "wide.png")
    with pytest.raises(ParameterError, match=f"at most {MAX_IMAGE_ASPECT}:1") as e:
        _image("--ip-image", str(path))
    assert e.value.name == "--ip-image"


def test_clip_preprocessing_refuses_an_image_of_extreme_aspect(tmp_path):
    from xa_runtime.plugins.ip_adapter_image import ClipPreprocess, preprocess_clip_images

    with pytest.raises(ParameterError, match=f"at most {MAX_IMAGE_ASPECT}:1"):
        preprocess_clip_images([extreme(tmp_path / "wide.png", 4096, 2)], ClipPreprocess.for_image_size(224))
    huge_crop = ClipPreprocess(shortest_edge=10**6, crop=(224, 224))  # a preprocessor_config asking for a terapixel
    with pytest.raises(ParameterError, match="pixels"):
        preprocess_clip_images([Image.new("RGB", (64, 64))], huge_crop)


def test_xa_serve_reads_images_with_the_same_bounds_and_scaling(tmp_path):
    from xa_runtime.serve.app import decode_image

    wide = base64.b64encode(extreme(tmp_path / "wide.png").read_bytes()).decode()
    with pytest.raises(ParameterError, match=f"at most {MAX_IMAGE_ASPECT}:1") as e:
        decode_image("images.ip", wide, 4096 * 4096)
    assert e.value.name == "images.ip"
    ramp = decode_image("images.control", base64.b64encode(png16(tmp_path / "r.png").read_bytes()).decode(), 4096**2)
    assert float((np.asarray(ramp) == 255).mean()) < 0.01


def test_read_image_names_the_parameter_for_bytes_that_are_no_image(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(ParameterError) as e:
        read_image(tmp_path / "x.png", "--control-image")
    assert e.value.name == "--control-image"
