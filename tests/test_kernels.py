"""The ffcv backend's native pieces on real photos: decode and resample are PIL's, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fastload import Manifest
from fastload.pipelines import native
from fastload.pipelines.jpeg import JPEGDecodeError, decode_rgb, jpeg_problem, thread_decoder
from fastload.pipelines.native import BILINEAR, FILTER_CODES
from fastload.pipelines.native_numba import resample_window, source_window
from fastload.pipelines.sampling import random_resized_crop_params
from fastload.formats.records import SplitReader

NO_NORM = (np.ones(3, np.float32), np.zeros(3, np.float32))


@pytest.fixture(scope="module")
def photos(imagenet_dirs):
    reader = SplitReader(Manifest.read(imagenet_dirs["tfrecord"]), "validation")
    return reader, [np.array(reader.stored(i)) for i in range(len(reader))]


def test_full_decode_is_pils(photos):
    """Accurate DCT + fancy upsampling: PIL's pixels exactly, on every stored image (the
    re-encoded grayscale/CMYK ones included)."""
    reader, jpegs = photos
    for i, jpeg in enumerate(jpegs):
        assert np.array_equal(decode_rgb(jpeg, reader.heights[i], reader.widths[i]), np.asarray(reader.image(i))), i


def test_region_decode_is_the_full_decodes_region(photos):
    """Decoding only some rows and iMCU columns gives exactly those pixels of the full decode
    (chroma-subsampled photos included: most of these are 4:2:0)."""
    reader, jpegs = photos
    rng = np.random.default_rng(0)
    decoder = thread_decoder()
    for i, jpeg in enumerate(jpegs):
        h, w = int(reader.heights[i]), int(reader.widths[i])
        full = decode_rgb(jpeg, h, w)
        for _ in range(4):
            ch, cw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
            y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            region, col0 = decoder.decode(jpeg, h, w, y0, y0 + ch, x0, x0 + cw)
            assert col0 <= x0
            assert np.array_equal(region[:, x0 - col0:x0 - col0 + cw], full[y0:y0 + ch, x0:x0 + cw]), (i, y0, x0)


PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS, "box": Image.BOX,
               "hamming": Image.HAMMING, "nearest": Image.NEAREST}


def _pil_two_pass(image: np.ndarray, out_h: int, out_w: int, resample=Image.BILINEAR,
                  vertical_first: bool = False) -> np.ndarray:
    """Pillow's resize as Pillow <= 12 runs it: horizontal pass, round, vertical pass (or the
    other way round)."""
    im = Image.fromarray(image)
    if vertical_first and out_h != im.height:
        im = im.resize((im.width, out_h), resample)
    if out_w != im.width:
        im = im.resize((out_w, im.height), resample)
    if out_h != im.height:
        im = im.resize((out_w, out_h), resample)
    return np.asarray(im)


@pytest.fixture(params=native.RESAMPLE_PATHS)
def resample_path(request):
    """Each code path of the horizontal pass this CPU has (portable C, SSE4.1, AVX2)."""
    best = native.resample_path()
    if native.RESAMPLE_PATHS.index(request.param) > native.RESAMPLE_PATHS.index(best):
        pytest.skip(f"this CPU has no {request.param}")
    native.resample_path(request.param)
    yield request.param
    native.resample_path(best)


@pytest.mark.parametrize("interpolation", sorted(PIL_FILTERS))
def test_resample_is_pils_on_random_resized_crops(photos, interpolation, resample_path):
    """RandomResizedCrop boxes of real photos, resampled from the decoded region only: exactly
    Pillow's two-pass result for each of its filters; a one-call ``Image.resize`` is that, or
    (Pillow 13, for some shapes) the vertical pass first, which rounds and clips differently
    between the passes: up to 11 levels at a few edge pixels with lanczos, 1 with bilinear."""
    filt, pil_filter = FILTER_CODES[interpolation], PIL_FILTERS[interpolation]
    reader, jpegs = photos
    h, w = reader.heights, reader.widths
    y, x, ch, cw = random_resized_crop_params(np.random.default_rng(1), h, w, (0.08, 1.0), (3 / 4, 4 / 3))
    decoder = thread_decoder()
    for i in range(0, len(jpegs), 3):
        full = decode_rgb(jpegs[i], int(h[i]), int(w[i]))
        box = np.ascontiguousarray(full[y[i]:y[i] + ch[i], x[i]:x[i] + cw[i]])
        r0, r1, c0, c1 = source_window(int(ch[i]), int(cw[i]), 224, 224, 0, 0, 224, 224, filt, 0)
        region, col0 = decoder.decode(jpegs[i], int(h[i]), int(w[i]), int(y[i]) + r0, int(y[i]) + r1,
                                      int(x[i]) + c0, int(x[i]) + c1)
        out = np.empty((224, 224, 3), np.uint8)
        resample_window(region, -r0, int(x[i]) - col0, int(ch[i]), int(cw[i]), 224, 224, 0, 0, False, 0, filt,
                        out, 224, 224, False, False, *NO_NORM)
        assert np.array_equal(out, _pil_two_pass(box, 224, 224, pil_filter)), i
        one_call = np.asarray(Image.fromarray(box).resize((224, 224), pil_filter))
        if not np.array_equal(out, one_call):  # Pillow 13 chose the vertical pass first for this shape
            assert np.array_equal(one_call, _pil_two_pass(box, 224, 224, pil_filter, vertical_first=True)), i


def test_fused_normalization_flip_and_layout(photos):
    reader, jpegs = photos
    h, w = int(reader.heights[0]), int(reader.widths[0])
    image = decode_rgb(jpegs[0], h, w)
    plain = np.empty((200, 150, 3), np.uint8)
    resample_window(image, 0, 0, h, w, 256, 300, 10, 20, False, 0, BILINEAR, plain, 200, 150, False, False, *NO_NORM)
    scale, shift = np.float32([0.1, 0.2, 0.3]), np.float32([1.0, 2.0, 3.0])
    chw = np.empty((3, 200, 150), np.float32)
    resample_window(image, 0, 0, h, w, 256, 300, 10, 20, True, 0, BILINEAR, chw, 200, 150, True, True, scale, shift)
    want = plain[:, ::-1].astype(np.float32) * scale - shift
    assert np.allclose(chw.transpose(1, 2, 0), want, atol=1e-5)


def test_corrupt_jpeg_is_refused(photos):
    reader, jpegs = photos
    h, w = int(reader.heights[0]), int(reader.widths[0])
    with pytest.raises(JPEGDecodeError):
        decode_rgb(np.frombuffer(b"not a jpeg at all", np.uint8), h, w)
    cut = jpegs[0][:len(jpegs[0]) // 2]  # truncated: libjpeg warns and fills gray; we refuse
    with pytest.raises(JPEGDecodeError, match="(?i)premature|corrupt"):
        decode_rgb(cut, h, w)


def _damaged(jpeg: bytes, rng) -> list[bytes]:
    """Truncations (mid-file, just the end marker, the last rows) and flipped bytes in the
    entropy-coded data."""
    scan = jpeg.find(b"\xff\xda") + 20
    flipped = []
    for _ in range(4):
        b = bytearray(jpeg)
        b[int(rng.integers(scan, len(jpeg) - 10))] ^= 0xFF
        flipped.append(bytes(b))
    return [jpeg[:len(jpeg) // 2], jpeg[:-2], jpeg[:-300], *flipped]


def test_jpeg_check_refuses_exactly_what_a_full_decode_refuses(photos):
    """The converter's cheap check (coded data read whole, pixels at 1/8 scale) passes a stored
    JPEG exactly when the backends' full decode does, on real photos damaged many ways."""
    reader, jpegs = photos
    rng = np.random.default_rng(0)
    refused = 0
    for i, jpeg in enumerate(jpegs[:40]):
        assert jpeg_problem(jpeg.tobytes()) is None, i
        for damaged in _damaged(jpeg.tobytes(), rng):
            try:
                decode_rgb(np.frombuffer(damaged, np.uint8), reader.heights[i], reader.widths[i])
                full = None
            except JPEGDecodeError as e:
                full = str(e)
            assert (jpeg_problem(damaged) is None) == (full is None), (i, full)
            refused += full is not None
    assert refused >= 100  # most damage shows (a flipped byte sometimes only changes pixels)


# --------------------------------------------------------------------------- bounds from a file
def test_resample_window_reads_nothing_outside_what_it_is_given():
    """Sizes come from a dataset's records index: a box larger than the pixels given is refused
    (code 2) before anything is read, for a crop and for a resample."""
    src = np.zeros((10, 10, 3), np.uint8)
    out = np.zeros((8, 8, 3), np.uint8)
    one, zero = np.ones(3, np.float32), np.zeros(3, np.float32)

    def call(src_rows, src_cols, y0, x0, h, w, out_h, out_w, top=0, left=0, pad=0):
        return native.LIB.fl_resample_window(src.ctypes.data, src_rows, src_cols, y0, x0, h, w, out_h, out_w, top,
                                             left, 0, pad, BILINEAR, out.ctypes.data, 8, 8, 0, 0, one.ctypes.data,
                                             zero.ctypes.data)
    assert call(10, 10, 0, 0, 10, 10, 8, 8) == 0                 # a resample inside
    assert call(10, 10, 0, 0, 60000, 10, 8, 8) == 2              # a box 60000 rows tall over 10 rows
    assert call(10, 10, 5, 0, 10, 10, 8, 8) == 2                 # a box that starts past the rows given
    assert call(10, 10, 0, 0, 10, 10, 10, 10, 1, 1) == 0         # a crop inside
    assert call(10, 10, 0, 4, 10, 10, 10, 10) == 2               # a crop reading columns 4..12 of 10
    assert call(10, 10, 0, 0, 20, 20, 20, 20, -4, -4, 2) == 0    # reflect padding: rows 0..4 mirrored, inside
    assert call(10, 10, 0, 0, 20, 20, 20, 20, 10, 10, 2) == 2    # a box larger than the pixels given
    assert call(0, 0, 0, 0, 10, 10, 10, 10, -40, -40) == 0       # a window all in constant padding: reads nothing


def test_region_decoder_checks_the_jpegs_size_and_its_buffer(photos):
    """The index's size must be the JPEG's, and the rows must fit the buffer: a message, not a write
    past the buffer."""
    import ctypes
    reader, jpegs = photos
    jpeg, h, w = jpegs[0], int(reader.heights[0]), int(reader.widths[0])
    message, col0 = ctypes.create_string_buffer(200), ctypes.c_int()
    out = np.empty(h * w * 3, np.uint8)

    def decode(height, width, stride, capacity):
        return native.LIB.fl_jpeg_decode_region(jpeg.ctypes.data, jpeg.size, height, width, 0, min(h, height), 0,
                                                min(w, width), out.ctypes.data, stride, capacity,
                                                ctypes.byref(col0), message, 200)
    assert decode(h, w, w * 3, out.size) == 0
    assert decode(h, 60000, 60000 * 3, out.size) == 1 and b"the records index says 60000x" in message.value
    assert decode(h, w, w * 3, out.size // 2) == 1 and b"does not fit" in message.value
    assert decode(h, w, w, out.size) == 1 and b"does not fit" in message.value  # rows wider than their pitch


def test_crc32c_is_the_standard_one():
    import crc32c
    rng = np.random.default_rng(0)
    for n in list(range(0, 40)) + [1000, 4097, 1 << 20]:
        data = rng.integers(0, 256, n, dtype=np.uint8)
        assert native.LIB.fl_crc32c(data.ctypes.data, n) == crc32c.crc32c(data.tobytes()), n


def test_one_column_regions_at_the_edges_are_the_full_decodes(photos):
    """A window that reads one source column (RandomCrop's edge padding mirrors column 0 or the last):
    libjpeg's cropped scanline under 3 columns wide was up to 7 levels off; widened, it is exact."""
    reader, jpegs = photos
    decoder = thread_decoder()
    for i, jpeg in enumerate(jpegs):
        h, w = int(reader.heights[i]), int(reader.widths[i])
        full = decode_rgb(jpeg, h, w)
        for y0, x0 in ((0, 0), (h - 11, 0), (h - 11, w - 1), (h // 2, w - 1)):
            region, col0 = decoder.decode(jpeg, h, w, y0, y0 + 11, x0, x0 + 1)
            assert np.array_equal(region[:, x0 - col0:x0 - col0 + 1], full[y0:y0 + 11, x0:x0 + 1]), (i, y0, x0)


def test_without_the_c_library_the_checks_fall_back_to_the_same_verdicts(photos, monkeypatch):
    """Where the library cannot load (a source install without headers), samples are checked by
    the crc32c package and PIL: the same sample fails, for the same reason, as in C."""
    from fastload.pipelines import jpeg as jpeg_module
    from fastload.pipelines.samples import SampleChecks
    reader, jpegs = photos
    checks = SampleChecks(reader)
    wrong_size = SampleChecks(reader)
    wrong_size.heights = wrong_size.heights + 1
    cases = []
    for i in range(0, len(jpegs), 40):
        flipped = jpegs[i].copy()
        flipped[len(flipped) // 2] ^= 0x10
        cases += [(checks, i, jpegs[i]), (checks, i, flipped), (wrong_size, i, jpegs[i])]
    in_c = [c._first_failure(np.array([i]), data) for c, i, data in cases]
    monkeypatch.setattr(native, "LIB", None)
    monkeypatch.setattr(jpeg_module, "_LIB", None)
    in_python = [c._first_failure(np.array([i]), data) for c, i, data in cases]
    assert [f is None for f in in_python] == [f is None for f in in_c] == [True, False, False] * (len(cases) // 3)
    for c_failure, python_failure in zip(in_c, in_python):
        if c_failure is not None:
            assert python_failure[0] == c_failure[0]
            assert python_failure[1].split(" (")[0] == c_failure[1].split(" (")[0]  # the same reason
    # the converter's check and decode: PIL's, the same pixels; a JPEG cut short is refused, with a warning
    whole = jpegs[0].tobytes()
    with pytest.warns(RuntimeWarning, match="checked by PIL"):
        assert jpeg_problem(whole) is None
    assert jpeg_problem(whole[: len(whole) // 2]) is not None
    assert np.array_equal(decode_rgb(jpegs[0], reader.heights[0], reader.widths[0]), np.asarray(reader.image(0)))
    with pytest.raises(native.NativeUnavailable, match="C helpers.*pip install"):
        jpeg_module.RegionDecoder()  # the ffcv and DALI-CPU backends' decoder
