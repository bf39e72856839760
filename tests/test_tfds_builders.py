"""TFDS's real ``cifar10`` and ``cifar100`` builders download, check and prepare an archive in
CIFAR's binary format, and energy_jax reads the result; failures name their cause.

No ``tfds.testing.mock_data``: a broken dependency of tensorflow-datasets (as
``importlib_resources`` was for 4.9.10 with etils 1.15) fails here. The archive is tiny and served from 127.0.0.1: the
builder's URL points there and its checksum is registered for it, everything else is TFDS's.
"""

import functools
import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest

from conftest import REPO

tfds = pytest.importorskip("tensorflow_datasets")

from energy_jax import data  # noqa: E402
from energy_jax.data import tfds_source  # noqa: E402

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")


def _records(labels, images):
  """CIFAR's binary records: the label byte(s), then the image as 3 x 32 x 32 (channels first)."""
  out = bytearray()
  for lab, img in zip(labels, images):
    out += bytes(int(v) for v in np.atleast_1d(lab))
    out += np.ascontiguousarray(img.transpose(2, 0, 1)).tobytes()
  return bytes(out)


def _tar_gz(members):
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    for name, payload in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  return buf.getvalue()


def tiny_cifar(name, per_batch=3, seed=0):
  """``(archive bytes, file name, {split: (images, labels)})`` in the real archive's layout."""
  rng = np.random.default_rng(seed)
  draw = lambda n: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  if name == "cifar10":
    splits = {f"data_batch_{i}.bin": "train" for i in range(1, 6)}
    splits["test_batch.bin"] = "test"
    members, truth = {}, {"train": ([], []), "test": ([], [])}
    for fname, split in splits.items():
      images, labels = draw(per_batch), rng.integers(0, 10, per_batch)
      members[f"cifar-10-batches-bin/{fname}"] = _records(labels, images)
      truth[split][0].append(images)
      truth[split][1].append(labels)
    members["cifar-10-batches-bin/batches.meta.txt"] = ("\n".join(CIFAR10_NAMES) + "\n").encode()
    archive = "cifar-10-binary.tar.gz"
  else:
    members, truth = {}, {}
    for fname, split, n in (("train.bin", "train", 2 * per_batch), ("test.bin", "test", per_batch)):
      images = draw(n)
      fine, coarse = rng.integers(0, 100, n), rng.integers(0, 20, n)
      members[f"cifar-100-binary/{fname}"] = _records(np.stack([coarse, fine], 1), images)
      truth[split] = ([images], [fine])                    # energy_jax reads the fine label
    members["cifar-100-binary/coarse_label_names.txt"] = "\n".join(
        f"super_{i}" for i in range(20)).encode()
    members["cifar-100-binary/fine_label_names.txt"] = "\n".join(
        f"class_{i}" for i in range(100)).encode()
    archive = "cifar-100-binary.tar.gz"
  truth = {k: (np.concatenate(v[0]), np.concatenate(v[1]).astype(np.int32))
           for k, v in truth.items()}
  return _tar_gz(members), archive, truth


class _Server:
  """A folder served over HTTP on 127.0.0.1 from a thread, counting the GET requests."""

  def __init__(self, root):
    self.requests = []
    outer = self

    class Handler(http.server.SimpleHTTPRequestHandler):
      def do_GET(self):
        outer.requests.append(self.path)
        super().do_GET()

      def log_message(self, *args):
        pass
    self.httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
  root = tmp_path / "www"
  root.mkdir()
  s = _Server(root)
  s.root = root
  yield s
  s.close()


def _point_builder_at(monkeypatch, name, url, size, sha256, filename):
  """The builder class of ``name`` downloads ``url`` and expects ``(size, sha256)`` from it."""
  from tensorflow_datasets.core import utils
  from tensorflow_datasets.core.download import checksums
  cls = type(tfds.builder(name))
  real = cls._cifar_info
  monkeypatch.setattr(cls, "_cifar_info", property(lambda self: real.fget(self)._replace(url=url)))
  monkeypatch.setattr(cls, "url_infos", {url: checksums.UrlInfo(
      size=utils.Size(size), checksum=sha256, filename=filename)})


def _serve(server, monkeypatch, name, sha256=None):
  payload, filename, truth = tiny_cifar(name)
  (server.root / filename).write_bytes(payload)
  url = f"{server.url}/{filename}"
  _point_builder_at(monkeypatch, name, url, len(payload),
                    sha256 or hashlib.sha256(payload).hexdigest(), filename)
  return url, truth


def _sorted(images, labels):
  order = sorted(range(len(labels)), key=lambda i: (int(labels[i]), images[i].tobytes()))
  return images[order], labels[order]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_real_builder_downloads_prepares_and_loads(name, server, monkeypatch, tmp_path):
  url, truth = _serve(server, monkeypatch, name)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  test = data.load(f"tfds:{name}", "test")
  assert server.requests == [f"/{os.path.basename(url)}"]         # downloaded once, over HTTP
  assert test.source == f"tfds:{name}:test"
  assert test.images.dtype == np.uint8 and test.labels.dtype == np.int32
  # TFDS stores the examples in its own (hashed) order: compare them sorted, bit for bit.
  for split, got in (("test", test), ("train", data.load(f"tfds:{name}", "train"))):
    want_images, want_labels = _sorted(*truth[split])
    got_images, got_labels = _sorted(got.images, got.labels)
    np.testing.assert_array_equal(got_labels, want_labels)
    np.testing.assert_array_equal(got_images, want_images)
    assert data.count(f"tfds:{name}", split) == len(want_labels)
  expected_names = CIFAR10_NAMES if name == "cifar10" else tuple(f"class_{i}" for i in range(100))
  assert test.class_names == expected_names
  assert len(server.requests) == 1                                 # prepared: no new download
  prepared = tmp_path / "tfds" / name
  assert prepared.is_dir() and any(prepared.rglob("*.tfrecord*"))


def test_wrong_checksum_is_named(server, monkeypatch, tmp_path):
  _serve(server, monkeypatch, "cifar10", sha256="0" * 64)
  with pytest.raises(tfds_source.TfdsUnavailable, match="wrong checksum") as e:
    tfds_source.load_tfds_arrays("cifar10", "test", data_dir=str(tmp_path / "tfds"))
  assert "Delete it from" in str(e.value) and str(tmp_path / "tfds") in str(e.value)


def test_unreachable_server_is_named(monkeypatch, tmp_path):
  from tensorflow_datasets.core.download import downloader
  with socket.socket() as s:          # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  _point_builder_at(monkeypatch, "cifar10", f"http://127.0.0.1:{port}/cifar-10-binary.tar.gz",
                    10, "0" * 64, "cifar-10-binary.tar.gz")
  monkeypatch.setattr(downloader, "MAX_RETRIES", 0)     # TFDS retries 10 times, ~100 s
  with pytest.raises(tfds_source.TfdsUnavailable, match="server cannot be reached") as e:
    tfds_source.load_tfds_arrays("cifar10", "test", data_dir=str(tmp_path / "tfds"))
  assert "no network" in str(e.value) and "tfds build cifar10" in str(e.value)


def test_missing_module_is_named(tmp_path):
  """With ``importlib_resources`` missing, preparing fails before any download, naming it."""
  script = (
      "import sys; sys.modules['importlib_resources'] = None\n"
      "from energy_jax.data import tfds_source\n"
      "try:\n"
      f"  tfds_source.load_tfds_arrays('cifar10', 'test', data_dir={str(tmp_path)!r})\n"
      "except tfds_source.TfdsUnavailable as e:\n"
      "  print('MESSAGE', e)\n")
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  message = out.stdout.split("MESSAGE", 1)[1]
  assert "the module 'importlib_resources', which is not installed" in message
  assert "pip install 'energy_jax[train]'" in message
  assert not (tmp_path / "downloads").exists() or not any((tmp_path / "downloads").iterdir())
