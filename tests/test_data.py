import io
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from energy_jax import data
from energy_jax.data import sources, synthetic
from conftest import shared_pack


def _write_folder(root, classes=("b", "a"), n=3, size=(32, 32), mode="RGB"):
  for c in classes:
    os.makedirs(root / "train" / c, exist_ok=True)
    for i in range(n):
      Image.new(mode, size, color=(10 * i) if mode == "L" else (10 * i, 0, 0)).save(
          root / "train" / c / f"{i}.png")


def test_folder_and_zip_are_read_the_same_with_sorted_classes(tmp_path):
  _write_folder(tmp_path / "f")
  a = sources.load_image_folder(str(tmp_path / "f"), "train")
  with zipfile.ZipFile(tmp_path / "f.zip", "w") as zf:
    for root, _, files in os.walk(tmp_path / "f"):
      for name in files:
        full = os.path.join(root, name)
        zf.write(full, os.path.relpath(full, tmp_path / "f"))
  b = sources.load_image_folder(str(tmp_path / "f.zip"), "train")
  assert a.class_names == b.class_names == ("a", "b")
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, [0, 0, 0, 1, 1, 1])
  # Counting reads the listing only: the same number as decoding, split by split.
  _write_folder(tmp_path / "f2", classes=("a",), n=2)
  os.rename(tmp_path / "f2" / "train", tmp_path / "f" / "test")
  assert data.count(str(tmp_path / "f"), "train") == 6
  assert data.count(str(tmp_path / "f"), "test") == len(data.load(str(tmp_path / "f"), "test")) == 2
  assert data.count(str(tmp_path / "f.zip"), "train") == len(b)
  np.save(tmp_path / "o.npy", np.zeros((5, 32, 32, 3), np.uint8))
  assert data.count(str(tmp_path / "o.npy")) == 5
  assert data.sources.resolve("tfds:cifar10") == ("tfds", "cifar10")
  assert data.sources.join_data_dir("/d", "o.npy") == "/d/o.npy"
  assert data.sources.join_data_dir("/d", "tfds:cifar10") == "tfds:cifar10"


def test_resize_center_crop_and_grayscale(tmp_path):
  img = np.zeros((64, 96), np.uint8)
  img[:, 40:56] = 255                       # a bright band at the centre
  os.makedirs(tmp_path / "g" / "c")
  Image.fromarray(img).save(tmp_path / "g" / "c" / "x.png")
  s = sources.load_image_folder(str(tmp_path / "g"))
  assert s.images.shape == (1, 32, 32, 3)
  assert np.all(s.images[0, :, 16, 0] > 200) and np.all(s.images[0, :, 2, 0] < 30)


def test_bad_sources_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing"):
    data.load(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="missing"):
    data.count(str(tmp_path / "missing"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ValueError, match="no images"):
    sources.load_image_folder(str(tmp_path / "empty"))
  _write_folder(tmp_path / "h", classes=("a",))
  os.makedirs(tmp_path / "h" / "train" / "z")
  with pytest.raises(ValueError, match=r"without images: \['z'\]"):
    sources.load_image_folder(str(tmp_path / "h"), "train")
  _write_folder(tmp_path / "k", classes=("a",))
  (tmp_path / "k" / "train" / "a" / "bad.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(ValueError, match="bad.jpg"):
    sources.load_image_folder(str(tmp_path / "k"), "train")
  np.save(tmp_path / "w.npy", np.zeros((4, 32, 32), np.uint8))
  with pytest.raises(ValueError, match=r"\[N, H, W, 3\].*\(4, 32, 32\)"):
    data.load(str(tmp_path / "w.npy"))
  np.save(tmp_path / "f.npy", np.zeros((4, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match="float32"):
    data.load(str(tmp_path / "f.npy"))


def test_synthetic_sets_follow_reference_transforms():
  rng = np.random.default_rng(0)
  base = data.ImageSet(rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
                           np.zeros(10, np.int32), ("",), "t")
  x = base.images
  inv = synthetic.invert(x)
  np.testing.assert_array_equal(inv[..., 0], x[..., 0])
  np.testing.assert_array_equal(inv[..., 1:], 255 - x[..., 1:])
  sh = synthetic.rgb_shift(x)
  np.testing.assert_array_equal(sh[..., 0], x[:, :, ::-1, 1])
  jig = synthetic.jigsaw(x)
  np.testing.assert_array_equal(jig[:, :8, :16], x[:, 8:16, :16])
  np.testing.assert_array_equal(jig[:, 16:, 16:24], x[:, :16, 24:])
  assert sorted(jig.reshape(-1)) == sorted(x.reshape(-1))
  for name in synthetic.VALIDATION_SETS:
    s = synthetic.make_ood_set(name, 6, seed=1, base=base)
    assert s.images.shape == (6, 32, 32, 3) and s.images.dtype == np.uint8
  with pytest.raises(ValueError, match="unknown synthetic"):
    synthetic.make_ood_set("fog", 3)
  with pytest.raises(ValueError) as e:
    synthetic.make_ood_set("uniform_noise", 3, seed=-5)
  assert str(e.value) == ("seed must be an integer in [0, 4294967296) (numpy's seeds are "
                          "non-negative, and JAX's keys hold 32 bits: PRNGKey(2**32) is "
                          "PRNGKey(0)), got -5")


def test_real_cifar10_pack_counts():
  path = shared_pack("cifar10.zip")
  test = sources.load_image_folder(path, "test")
  assert len(test) == 10_000 and test.num_classes == 10
  assert data.count(path, "test") == 10_000
  assert data.count(path, "train") == 50_000
  assert np.all(np.bincount(test.labels) == 1000)
  assert test.class_names[0] == "airplane" and test.class_names[-1] == "truck"


@pytest.mark.slow
def test_real_cifar10_train_split():
  train = sources.load_image_folder(shared_pack("cifar10.zip"), "train")
  assert len(train) == 50_000 and np.all(np.bincount(train.labels) == 5000)


# ----- bit depths and modes: every image reaches 8-bit RGB at its true scale ----------------------

def _png16(samples: np.ndarray, color_type: int) -> bytes:
  """A 16-bit PNG of ``samples [H, W, C]`` (PIL writes 16-bit grayscale only). Rows alternate the
  None, Sub and Up filters, so that a decoder unfiltering with the wrong bytes per pixel shows."""
  import struct
  import zlib
  h, w, c = samples.shape
  rows = []
  prev = np.zeros(w * c * 2, np.uint8)
  for y in range(h):
    raw = np.frombuffer(samples[y].astype(">u2").tobytes(), np.uint8)
    kind = y % 3
    if kind == 1:        # Sub: each byte minus the byte one pixel (2c bytes) to its left
      filtered = raw - np.r_[np.zeros(2 * c, np.uint8), raw[:-2 * c]]
    elif kind == 2:      # Up: minus the byte above
      filtered = raw - prev
    else:
      filtered = raw
    rows.append(bytes([kind]) + filtered.astype(np.uint8).tobytes())
    prev = raw

  def chunk(tag, body):
    return (struct.pack(">I", len(body)) + tag + body +
            struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF))
  ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
          chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def _tiff16_rgb(samples: np.ndarray) -> bytes:
  """An uncompressed little-endian 16-bit RGB TIFF of ``samples [H, W, 3]``."""
  import struct
  h, w, _ = samples.shape
  pixels = samples.astype("<u2").tobytes()
  count = 9
  bits_at = 8 + 2 + 12 * count + 4
  data_at = bits_at + 6
  short = lambda tag, value: struct.pack("<HHIHH", tag, 3, 1, value, 0)
  entries = [short(256, w), short(257, h), struct.pack("<HHII", 258, 3, 3, bits_at),
             short(259, 1), short(262, 2), struct.pack("<HHII", 273, 4, 1, data_at),
             short(277, 3), short(278, h), struct.pack("<HHII", 279, 4, 1, len(pixels))]
  return (b"II*\x00" + struct.pack("<IH", 8, count) + b"".join(entries) + struct.pack("<I", 0) +
          struct.pack("<HHH", 16, 16, 16) + pixels)


def _folder_of(tmp_path, name: str, blob: bytes) -> str:
  os.makedirs(tmp_path / "set" / "c", exist_ok=True)
  (tmp_path / "set" / "c" / name).write_bytes(blob)
  return str(tmp_path / "set")


# 16-bit samples across the range, with the values where v >> 8 (PIL's high byte) and the
# nearest 8-bit value round(v / 257) differ: 386 -> 2 (high byte 1), 65534 -> 255 (high byte 255
# too, but 254 for a decoder that divides by 257 and truncates).
_SAMPLES16 = np.random.default_rng(7).integers(0, 65536, (32, 32, 4)).astype(np.uint16)
_SAMPLES16[0, :3, :4] = [[386, 383, 0, 65535], [30000, 65534, 32896, 128], [129, 257, 1, 2]]


def _nearest_8_bit(v):
  return np.floor(v.astype(np.float64) / 65535 * 255 + 0.5).astype(np.uint8)


@pytest.mark.parametrize("color_type, channels", [(0, 1), (2, 3), (6, 4), (4, 2)],
                         ids=["gray", "rgb", "rgba", "gray_alpha"])
def test_16_bit_pngs_decode_to_the_nearest_8_bit_value(tmp_path, color_type, channels):
  folder = _folder_of(tmp_path, "x.png", _png16(_SAMPLES16[..., :channels], color_type))
  got = sources.load_image_folder(folder, image_size=32).images[0]
  expected = _nearest_8_bit(_SAMPLES16[..., :3] if channels >= 3 else
                            np.repeat(_SAMPLES16[..., :1], 3, axis=-1))   # alpha dropped
  np.testing.assert_array_equal(got, expected)
  assert got[0, 0, 0] == 2 and got[0, 1, 0] == 117     # not the high byte, not clipped white
  as_is = sources.load_image_folder(folder, image_size=None).images[0]
  np.testing.assert_array_equal(as_is, expected)


def test_16_bit_grayscale_written_by_pil_is_not_white(tmp_path):
  gray = _SAMPLES16[..., 0]
  Image.fromarray(gray).save(tmp_path / "g.png")          # PIL mode I;16
  folder = _folder_of(tmp_path, "g.png", (tmp_path / "g.png").read_bytes())
  got = sources.load_image_folder(folder).images[0]
  np.testing.assert_array_equal(got, np.repeat(_nearest_8_bit(gray)[..., None], 3, axis=-1))
  assert np.mean(got == 255) < 0.01                   # convert("RGB") made ~99% of them 255
  # Resized, the same 8-bit image goes through the same bilinear resize as an 8-bit PNG.
  Image.fromarray(_nearest_8_bit(gray)).save(tmp_path / "g8.png")
  small16 = sources._decode("g.png", (tmp_path / "g.png").read_bytes(), 16)
  small8 = sources._decode("g8.png", (tmp_path / "g8.png").read_bytes(), 16)
  np.testing.assert_array_equal(small16, small8)


def test_16_bit_tiff_and_pgm(tmp_path):
  rgb = _SAMPLES16[..., :3]
  got = sources._decode("x.tif", _tiff16_rgb(rgb), 32)
  np.testing.assert_array_equal(got, _nearest_8_bit(rgb))
  gray = _SAMPLES16[..., 0]
  pgm = b"P5\n32 32\n65535\n" + gray.astype(">u2").tobytes()     # PIL mode I
  got = sources._decode("x.pgm", pgm, 32)
  np.testing.assert_array_equal(got, np.repeat(_nearest_8_bit(gray)[..., None], 3, axis=-1))
  # A 10-bit PGM: PIL scales its maxval 1023 to 65535 first.
  ten = np.array([[0, 1, 511, 1023]], np.uint16)
  got = sources._decode("t.pgm", b"P5\n4 1\n1023\n" + ten.astype(">u2").tobytes(), None)
  np.testing.assert_array_equal(got[0, :, 0], np.floor(ten[0] / 1023 * 255 + 0.5))


def test_palette_gray_alpha_and_rgba_become_their_rgb(tmp_path):
  rng = np.random.default_rng(3)
  index = rng.integers(0, 4, (32, 32)).astype(np.uint8)
  palette = np.array([[255, 0, 0], [0, 128, 255], [9, 9, 9], [200, 100, 50]], np.uint8)
  p = Image.fromarray(index, "P")
  p.putpalette(palette.reshape(-1).tolist())
  rgba = rng.integers(0, 256, (32, 32, 4)).astype(np.uint8)
  la = rng.integers(0, 256, (32, 32, 2)).astype(np.uint8)
  cases = {"p.png": (p, palette[index]),
           "rgba.png": (Image.fromarray(rgba, "RGBA"), rgba[..., :3]),
           "la.png": (Image.fromarray(la, "LA"), np.repeat(la[..., :1], 3, axis=-1))}
  for name, (image, expected) in cases.items():
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    np.testing.assert_array_equal(sources._decode(name, buf.getvalue(), 32), expected, name)


def test_pixels_without_a_range_are_refused(tmp_path):
  buf = io.BytesIO()
  Image.fromarray(np.array([[0.5, 1.0]], np.float32)).save(buf, format="TIFF")
  folder = _folder_of(tmp_path, "f.tif", buf.getvalue())
  with pytest.raises(ValueError) as e:
    sources.load_image_folder(folder)
  assert str(e.value) == (
      f"{folder}:c/f.tif: 32-bit floating-point pixels (PIL mode F, TIFF) have no defined range "
      "to bring to 8 bits: save the image with 8 or 16 bits per sample")
  buf = io.BytesIO()
  Image.fromarray(np.array([[5, 100000]], np.int32)).save(buf, format="TIFF")
  with pytest.raises(ValueError, match=r"^i.tif: 32-bit integer pixels \(PIL mode I, TIFF\)"):
    sources._decode("i.tif", buf.getvalue(), 32)
