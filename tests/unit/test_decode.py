"""Decode-time crops follow RandomResizedCrop, every image mode becomes faithful RGB, bad images say why."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from clipscale.data import decode
from clipscale.data.decode import decode_crop, open_image, random_resized_crop_box, to_rgb
from clipscale.data.shards import BadSample
from tests.shard_kit import image_bytes


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def crop_stats(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return np.stack([w * h / (width * height), np.log(w / h), boxes[:, 0] / width, boxes[:, 1] / height], 1)


@pytest.mark.parametrize("width,height,scale", [(384, 288, (0.9, 1.0)), (500, 200, (0.08, 1.0)), (64, 64, (0.3, 1.0))])
def test_crop_boxes_have_random_resized_crops_distribution(width, height, scale):
    n = 4000
    rng = random.Random(0)
    ours = np.array([random_resized_crop_box(width, height, rng, scale=scale) for _ in range(n)])
    torch.manual_seed(0)
    ref = []
    for _ in range(n):
        top, left, h, w = RandomResizedCrop.get_params(torch.empty(3, height, width), scale, (3 / 4, 4 / 3))
        ref.append((left, top, left + w, top + h))
    ours, ref = crop_stats(ours, width, height), crop_stats(np.array(ref), width, height)
    assert ((ours[:, 0] > 0) & (ours[:, 0] <= 1)).all()
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):  # quantiles of area, log aspect and position agree
        np.testing.assert_allclose(np.quantile(ours, q, axis=0), np.quantile(ref, q, axis=0), atol=0.03)


@pytest.mark.parametrize("width,height", [(1000, 10), (10, 1000)])
def test_fallback_is_torchvisions_centre_crop(width, height):
    # A thin strip never fits a crop of the allowed aspect: both fall back to the same centre crop.
    box = random_resized_crop_box(width, height, random.Random(0), scale=(0.9, 1.0))
    top, left, h, w = RandomResizedCrop.get_params(torch.empty(3, height, width), (0.9, 1.0), (3 / 4, 4 / 3))
    assert box == (left, top, left + w, top + h)


def test_crop_equals_a_reference_resize_of_the_same_box():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    data = encode(img)
    out = decode_crop(data, size=32, rng=random.Random(5), scale=(0.5, 1.0))
    box = random_resized_crop_box(80, 60, random.Random(5), scale=(0.5, 1.0))
    expected = np.asarray(img.resize((32, 32), Image.BICUBIC, box=box)).transpose(2, 0, 1)
    assert out.dtype == np.uint8 and out.shape == (3, 32, 32)
    np.testing.assert_array_equal(out, expected)


def test_reduced_size_jpeg_decode_stays_close_to_full_decode():
    # Smooth content so that the comparison measures the DCT-scaled decode, not aliasing.
    y, x = np.mgrid[0:768, 0:1024].astype(np.float32)
    pixels = np.stack([128 + 100 * np.sin(x / 90), 128 + 100 * np.cos(y / 70), (x + y) / 7], -1)
    data = encode(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)), "JPEG", quality=95)
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (256, 192))
    assert img.size == (256, 192)  # the fast path really is taken for this crop size
    out = decode_crop(data, size=64, rng=random.Random(3), scale=(0.9, 1.0)).astype(float)
    box = random_resized_crop_box(1024, 768, random.Random(3), scale=(0.9, 1.0))
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), Image.BICUBIC, box=box)
    assert np.abs(out - np.asarray(full).transpose(2, 0, 1)).mean() < 2.0


def no_pil_path(*args, **kwargs):
    raise AssertionError("the JPEG crop went through PIL's resize, not the torch path")


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_crop_of_a_web_sized_image_matches_pils_bicubic(monkeypatch, mode):
    """A 96 px JPEG cropped to 64 px: torchvision decode + torch's antialiased bicubic, as PIL's."""
    y, x = np.mgrid[0:96, 0:96].astype(np.float32)
    noise = np.random.default_rng(2).normal(0, 20, (96, 96, 3))
    pixels = np.stack([128 + 90 * np.sin(x / 7), 128 + 90 * np.cos(y / 5), x + y], -1) + noise
    data = encode(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert(mode), "JPEG", quality=90)
    monkeypatch.setattr(decode, "_pil_crop", no_pil_path)
    out = decode_crop(data, size=64, rng=random.Random(4), scale=(0.5, 1.0))
    box = random_resized_crop_box(96, 96, random.Random(4), scale=(0.5, 1.0))
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), Image.BICUBIC, box=box))
    diff = np.abs(out.astype(int) - want.transpose(2, 0, 1).astype(int))
    assert out.dtype == np.uint8 and out.shape == (3, 64, 64)
    assert diff.mean() < 0.5 and diff.max() <= 8  # the same filter; only rounding differs


def test_truncated_jpeg_on_the_torch_path_is_corrupt(monkeypatch):
    monkeypatch.setattr(decode, "_pil_crop", no_pil_path)
    data = image_bytes(0, size=64)
    for cut in (300, len(data) // 2, len(data) - 8):
        with pytest.raises(BadSample) as e:
            decode_crop(data[:cut], size=48, rng=random.Random(0), scale=(0.9, 1.0))
        assert e.value.reason == "corrupt_image"


def test_transparency_is_composited_on_white():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:4] = (255, 0, 0, 255)  # opaque red top, fully transparent black bottom
    rgb = np.asarray(to_rgb(open_image(encode(Image.fromarray(rgba, "RGBA")))))
    assert (rgb[:4] == (255, 0, 0)).all() and (rgb[4:] == 255).all()
    la = Image.fromarray(np.zeros((8, 8, 2), dtype=np.uint8), "LA")
    assert (np.asarray(to_rgb(open_image(encode(la)))) == 255).all()
    pal = Image.fromarray(np.zeros((8, 8), dtype=np.uint8), "P")
    pal.info["transparency"] = 0
    assert (np.asarray(to_rgb(open_image(encode(pal, transparency=0)))) == 255).all()


def test_sixteen_bit_grey_is_rescaled_not_clipped():
    grey = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    img = open_image(encode(Image.fromarray(grey)))
    assert img.mode.startswith("I")
    rgb = np.asarray(to_rgb(img)).astype(int)
    np.testing.assert_allclose(rgb[..., 0], grey / 257, atol=1)
    assert (rgb[..., 0] == rgb[..., 2]).all()


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("1", "PNG"), ("RGB", "WEBP")])
def test_other_modes_decode_to_rgb(mode, fmt):
    out = decode_crop(image_bytes(0, size=40, fmt=fmt, mode=mode), size=16, rng=random.Random(0),
                      scale=(0.9, 1.0))
    assert out.shape == (3, 16, 16) and out.dtype == np.uint8


def test_cmyk_keeps_its_colours():
    red = Image.new("RGB", (32, 32), (220, 20, 20))
    out = decode_crop(encode(red.convert("CMYK"), "JPEG", quality=95), size=8, rng=random.Random(0),
                      scale=(1.0, 1.0))
    np.testing.assert_allclose(out.reshape(3, -1).mean(1), (220, 20, 20), atol=8)


def bad_reason(data: bytes) -> str:
    with pytest.raises(BadSample) as e:
        decode_crop(data, size=8, rng=random.Random(0), scale=(0.9, 1.0))
    return e.value.reason


def test_bad_images_name_their_reason(monkeypatch):
    assert bad_reason(b"") == "empty_image"
    assert bad_reason(b"plain text, no image") == "not_an_image"
    assert bad_reason(image_bytes(0, size=64)[:300]) == "corrupt_image"  # truncated JPEG
    assert bad_reason(image_bytes(0, size=64, fmt="PNG")[:100]) == "corrupt_image"  # truncated PNG
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
    assert bad_reason(image_bytes(0, size=64)) == "decompression_bomb"


@pytest.mark.parametrize("mode,options", [
    ("RGB", {}), ("RGB", {"progressive": True}), ("RGB", {"restart_marker_blocks": 1}),
    ("RGB", {"exif": b"Exif\x00\x00" + bytes(40), "icc_profile": bytes(300)}), ("L", {}), ("CMYK", {}),
], ids=["baseline", "progressive", "restart-markers", "exif-icc", "grey", "cmyk"])
def test_jpeg_frame_reads_what_pil_reads(mode, options):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)).convert(mode)
    data = encode(img, "JPEG", quality=90, **options)
    width, height, components = decode.jpeg_frame(data)
    assert (width, height) == Image.open(io.BytesIO(data)).size == (53, 37)
    assert components == len(mode)


def test_jpeg_frame_declines_what_it_does_not_read():
    jpeg = image_bytes(0, size=40)
    sof = jpeg.index(b"\xff\xc0")
    assert decode.jpeg_frame(image_bytes(0, fmt="PNG")) is None
    assert decode.jpeg_frame(jpeg[:sof]) is None  # cut before the frame header
    assert decode.jpeg_frame(jpeg[:sof + 1] + b"\xc3" + jpeg[sof + 2:]) is None  # lossless: PIL's to refuse
    assert decode.jpeg_frame(b"\xff\xd8\xff\xda" + bytes(20)) is None  # a scan before any frame


def test_jpeg_bomb_is_caught_from_the_frame_header():
    jpeg = bytearray(image_bytes(0, size=40))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = (60000).to_bytes(2, "big") * 2  # claims 60000 x 60000 pixels
    assert bad_reason(bytes(jpeg)) == "decompression_bomb"


def smooth_jpeg(width: int, height: int, mode: str = "RGB") -> bytes:
    """A JPEG of smooth gradients (where decoders and resamplers agree closely)."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1)
    return encode(Image.fromarray(pixels.astype(np.uint8)).convert(mode), "JPEG", quality=95)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_jpeg_for_the_device_carries_the_box_the_cpu_path_draws(mode):
    data = image_bytes(3, size=40, mode=mode)
    jpeg = decode_crop(data, size=16, rng=random.Random(5), scale=(0.3, 1.0), jpeg_to_device=True)
    assert jpeg == decode.JpegCrop(data, random_resized_crop_box(40, 40, random.Random(5), scale=(0.3, 1.0)))


@pytest.mark.parametrize("data", [image_bytes(1, fmt="PNG"), image_bytes(2, mode="CMYK"), image_bytes(3)[:-40]],
                         ids=["png", "cmyk-jpeg", "jpeg-cut-short"])
def test_other_images_are_decoded_in_the_worker_even_for_the_device(data):
    def crop(**kw):
        try:
            return decode_crop(data, size=16, rng=random.Random(2), scale=(0.5, 1.0), **kw)
        except BadSample as e:
            return e.reason
    on_cpu = crop()
    for_device = crop(jpeg_to_device=True)
    assert not isinstance(for_device, decode.JpegCrop)
    assert for_device == on_cpu if isinstance(on_cpu, str) else np.array_equal(for_device, on_cpu)


def test_device_decode_equals_the_cpu_path_and_leaves_an_undecodable_jpeg_black(caplog):
    datas = [image_bytes(i, size=28) for i in range(3)] + [smooth_jpeg(50, 30, "L")]
    rng = random.Random(0)
    jpegs = [decode_crop(d, size=16, rng=rng, scale=(0.5, 1.0), jpeg_to_device=True) for d in datas]
    good = image_bytes(9, size=28)
    header_only = good[:good.index(b"\xff\xda")] + decode.EOI  # a frame header, then no scan to decode
    jpegs.append(decode.JpegCrop(header_only, (0, 0, 28, 28)))
    out = decode.decode_jpegs_on(jpegs, size=16, device=torch.device("cpu"))
    rng = random.Random(0)
    for got, data in zip(out, datas):  # crops under 2x the output: the CPU path decodes in full too
        np.testing.assert_array_equal(got.numpy(), decode_crop(data, size=16, rng=rng, scale=(0.5, 1.0)))
    assert not out[-1].any() and "left black" in caplog.text


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU JPEG decoding needs a CUDA device")


@CUDA
def test_gpu_decode_matches_the_cpu_path():
    cuda = torch.device("cuda")
    datas = [smooth_jpeg(w, h, mode) for w, h, mode in [(64, 48, "RGB"), (640, 360, "RGB"), (300, 500, "L")]]
    datas += [image_bytes(i, size=96) for i in range(4)]
    jpegs = [decode_crop(d, size=32, rng=random.Random(i), scale=(0.3, 1.0), jpeg_to_device=True)
             for i, d in enumerate(datas)]
    on_gpu = decode.decode_jpegs_on(jpegs, size=32, device=cuda)
    on_cpu = decode.decode_jpegs_on(jpegs, size=32, device=torch.device("cpu"))  # the same full decode
    assert on_gpu.device.type == "cuda"
    diff = (on_gpu.cpu().int() - on_cpu.int()).abs()
    assert diff.float().mean() < 1.5 and diff.max() <= 40  # nvJPEG vs libjpeg IDCT and chroma upsampling
    for i, data in enumerate(datas[:3]):  # and the worker's own path (reduced-size decode for big crops)
        cpu = decode_crop(data, size=32, rng=random.Random(i), scale=(0.3, 1.0))
        assert np.abs(on_gpu[i].cpu().numpy().astype(int) - cpu).mean() < 3
