"""energy_jax.fetch against a server on 127.0.0.1 serving tiny stand-ins in each real format: a
tar.gz of a folder of PNGs (LSUN-C), the .npy (300K random images), a .mat (SVHN) and a .pt (a
tiny WRN's state_dict, whose git blob id is computed here and put in place of the authors')."""

import dataclasses
import errno
import hashlib
import http.server
import io
import json
import os
import socket
import sys
import tarfile
import threading
import time

import numpy as np
import pytest

from energy_jax import fetch
from energy_jax.data import sources

PT = "energy_ood:cifar10_energy_ft"


class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves ``server.files`` by name, with Range requests unless ``server.ignore_range``, and an
  ETag that If-Range is compared with (``server.if_range`` lists those received); with
  ``server.drop_after = n`` the next response announces the whole length but sends n bytes; with
  ``server.range_from = k`` a Range request gets a 206 from byte k (not the one asked for)."""

  def do_GET(self):
    srv = self.server
    name = self.path.lstrip("/")
    srv.requests.append((name, self.headers.get("Range")))
    data = srv.files.get(name)
    if data is None:
      self.send_error(404)
      return
    # Taken now, before the client sees this response: a handler whose response the client
    # dropped after its headers (a 206 from the wrong byte) runs on late, and must not consume a
    # drop that the test set afterwards for the next request.
    drop_after, srv.drop_after = srv.drop_after, None
    start = 0
    given = self.headers.get("Range")
    etag = '"%s"' % hashlib.sha1(data).hexdigest()
    if_range = self.headers.get("If-Range")
    if if_range is not None:
      srv.if_range.append(if_range)
    if given and not srv.ignore_range and if_range in (None, etag):
      start = int(given.split("=")[1].split("-")[0])
      if srv.range_from is not None:
        start, srv.range_from = srv.range_from, None
      if start >= len(data):                  # nothing from there: 416, naming the size
        self.send_response(416)
        self.send_header("Content-Range", f"bytes */{len(data)}")
        self.send_header("Content-Length", "0")
        self.end_headers()
        return
      self.send_response(206)
      self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    else:
      self.send_response(200)
    self.send_header("ETag", etag)
    body = data[start:]
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    time.sleep(srv.delay)                     # a slow server: concurrent fetches overlap
    if drop_after is not None:                # the connection drops mid-file
      body = body[:drop_after]
    self.wfile.write(body)

  def log_message(self, *args):
    pass


@pytest.fixture
def server(tmp_path, monkeypatch):
  srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  srv.files, srv.requests, srv.ignore_range, srv.drop_after = {}, [], False, None
  srv.delay, srv.if_range, srv.range_from = 0, [], None
  thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
  thread.start()
  monkeypatch.setenv(fetch.MIRROR_ENV, f"http://127.0.0.1:{srv.server_address[1]}/")
  monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))
  yield srv
  srv.shutdown()
  srv.server_close()


def _serve(srv, monkeypatch, name, data, checksum="keep"):
  """Serves ``data`` as ``name``'s file; a published checksum is replaced by ``data``'s."""
  entry = fetch.ENTRIES[name]
  if checksum == "keep" and entry.checksum is not None:
    algorithm = entry.checksum[0]
    if algorithm == "git-blob":
      checksum = ("git-blob", hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
    else:
      checksum = (algorithm, hashlib.new(algorithm, data).hexdigest())
  elif checksum == "keep":
    checksum = None
  monkeypatch.setitem(fetch.ENTRIES, name, dataclasses.replace(entry, checksum=checksum))
  srv.files[entry.filename] = data
  return entry


def _npy(n=4):
  images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  buf = io.BytesIO()
  np.save(buf, images)
  return images, buf.getvalue()


def _png_tar_gz(top="LSUN", n=3, size=36, mode="w:gz"):
  """A tar.gz (``mode="w"``: a plain tar) of ``n`` PNGs in ``{top}/test/``."""
  from PIL import Image
  rng = np.random.default_rng(1)
  images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode=mode) as tar:
    for i, image in enumerate(images):
      png = io.BytesIO()
      Image.fromarray(image).save(png, format="PNG")
      info = tarfile.TarInfo(f"{top}/test/{i}.png")
      info.size = len(png.getvalue())
      tar.addfile(info, io.BytesIO(png.getvalue()))
  return images, buf.getvalue()


def _cache(*parts):
  return os.path.join(fetch.cache_dir(), *parts)


def test_download_check_unpack_and_a_second_call_from_the_cache(server, monkeypatch):
  images, data = _npy()
  _serve(server, monkeypatch, "energy_ood:300k_random_images", data)
  got = sources.load("energy_ood:300k_random_images")
  np.testing.assert_array_equal(got.images, images)
  manifest = json.load(open(_cache("manifest.json")))
  assert manifest["energy_ood:300k_random_images"]["sha256"] == hashlib.sha256(data).hexdigest()
  assert not os.path.exists(_cache("downloads", "300K_random_images.npy.part"))
  # A tar.gz of PNGs, read as it is (LSUN-C's 36x36), and SVHN's .mat (X [32, 32, 3, N]).
  pngs, tgz = _png_tar_gz()
  _serve(server, monkeypatch, "energy_ood:lsun_c", tgz)
  np.testing.assert_array_equal(sources.load("energy_ood:lsun_c", None, None).images,
                                np.stack(pngs))
  from scipy import io as scipy_io
  svhn = np.random.default_rng(2).integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
  mat = io.BytesIO()
  scipy_io.savemat(mat, {"X": svhn, "y": np.arange(1, 6)[:, None]})
  _serve(server, monkeypatch, "energy_ood:svhn", mat.getvalue())
  np.testing.assert_array_equal(sources.load("energy_ood:svhn", None, None).images,
                                np.transpose(svhn, (3, 0, 1, 2)))
  assert sources.count("energy_ood:lsun_c") == 3
  # Every later call is served from the cache: no request.
  before = len(server.requests)
  for name in ("energy_ood:300k_random_images", "energy_ood:lsun_c", "energy_ood:svhn"):
    fetch.path(name)
  assert len(server.requests) == before == 3
  listed = fetch.list_names()
  assert "energy_ood:lsun_c" in listed and "yes (unpacked)" in listed
  assert f"{len(data):,}" in listed                        # the size recorded at the download
  assert fetch.main(["list"]) == 0


def test_an_interrupted_download_resumes_with_a_range_request(server, monkeypatch, capsys):
  images, data = _npy(8)
  _serve(server, monkeypatch, "energy_ood:300k_random_images", data)
  server.drop_after = len(data) // 2
  with pytest.raises(fetch.FetchError, match="broke off.*run the same command again to resume"):
    fetch.path("energy_ood:300k_random_images")
  part = _cache("downloads", "300K_random_images.npy.part")
  assert os.path.getsize(part) == len(data) // 2
  assert not os.path.exists(_cache("downloads", "300K_random_images.npy"))
  path = fetch.path("energy_ood:300k_random_images")
  assert server.requests[-1] == ("300K_random_images.npy", f"bytes={len(data) // 2}-")
  assert open(path, "rb").read() == data and not os.path.exists(part)
  # A server that ignores the range: the download restarts from the first byte.
  os.remove(path)
  with open(part, "wb") as f:
    f.write(b"\0" * 100)
  server.ignore_range = True
  assert open(fetch.path("energy_ood:300k_random_images"), "rb").read() == data
  assert "ignored the range request" in capsys.readouterr().err


def test_a_resume_never_splices_two_versions_or_two_places(server, monkeypatch, capsys):
  _, data = _npy(8)
  _serve(server, monkeypatch, "energy_ood:300k_random_images", data)
  name, part = "300K_random_images.npy", _cache("downloads", "300K_random_images.npy.part")
  half = len(data) // 2
  # A 206 whose Content-Range starts elsewhere than the part's end: the part is dropped and the
  # file fetched whole (no range), not spliced.
  server.drop_after = half
  with pytest.raises(fetch.FetchError, match="broke off"):
    fetch.path("energy_ood:300k_random_images")
  server.range_from = 10
  path = fetch.path("energy_ood:300k_random_images")
  assert open(path, "rb").read() == data
  assert server.requests[-2:] == [(name, f"bytes={half}-"), (name, None)]
  assert "not the rest of the part" in capsys.readouterr().err
  # The resume names the version the part came from (If-Range: its ETag); the file at the URL
  # changed since, so the server sends the whole new one, which replaces the part.
  os.remove(path)
  assert server.if_range == ['"%s"' % hashlib.sha1(data).hexdigest()]
  json.dump({}, open(_cache("manifest.json"), "w"))          # the new version is expected
  server.drop_after = half
  with pytest.raises(fetch.FetchError, match="broke off"):
    fetch.path("energy_ood:300k_random_images")
  assert os.path.getsize(part) == half
  _, new = _npy(9)
  server.files[name] = new
  assert open(fetch.path("energy_ood:300k_random_images"), "rb").read() == new
  assert server.requests[-1] == (name, f"bytes={half}-")     # answered 200: the whole file
  assert server.if_range[-1] == '"%s"' % hashlib.sha1(data).hexdigest()
  assert not os.path.exists(part) and not os.path.exists(part + ".validator")
  # A 416 is trusted only when its Content-Range says the file is the part's size.
  os.remove(_cache("downloads", name))
  json.dump({}, open(_cache("manifest.json"), "w"))
  with open(part, "wb") as f:
    f.write(new + b"junk")
  assert open(fetch.path("energy_ood:300k_random_images"), "rb").read() == new
  assert server.requests[-2:] == [(name, f"bytes={len(new) + 4}-"), (name, None)]
  assert "refused the range" in capsys.readouterr().err


def test_a_wrong_checksum_is_refused_and_nothing_whole_is_left(server, monkeypatch):
  _, data = _npy()
  entry = _serve(server, monkeypatch, "energy_ood:textures", data,
                 checksum=("md5", "0" * 32))
  with pytest.raises(fetch.FetchError, match=r"energy_ood:textures: the download from http://"
                     r".*dtd-r1.0.1.tar.gz has md5 .*expected 0{32}.*moved aside"):
    fetch.path("energy_ood:textures")
  folder = _cache("downloads")
  assert sorted(os.listdir(folder)) == [entry.filename + ".bad", entry.filename + ".lock"]
  assert not os.path.exists(_cache("energy_ood", "textures"))
  # No published checksum: a later download that differs from the first one's record.
  _, first = _npy()
  _serve(server, monkeypatch, "energy_ood:300k_random_images", first)
  os.remove(fetch.path("energy_ood:300k_random_images"))
  server.files["300K_random_images.npy"] = _npy(5)[1]
  with pytest.raises(fetch.FetchError, match="recorded at its first download"):
    fetch.path("energy_ood:300k_random_images")


def test_concurrent_fetches_of_one_name_share_one_download(server, monkeypatch):
  # Two threads at once: the second waits on the file's lock and is served from the cache (one
  # request, one whole file), where both used to write one .part and splice their bytes.
  _, data = _npy(8)
  _serve(server, monkeypatch, "energy_ood:300k_random_images", data)
  server.delay = 0.3
  got, errors = [], []

  def run():
    try:
      got.append(fetch.path("energy_ood:300k_random_images"))
    except Exception as e:              # shown by the assertion below
      errors.append(e)

  threads = [threading.Thread(target=run) for _ in range(2)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not errors and len(got) == 2 and got[0] == got[1]
  assert open(got[0], "rb").read() == data
  assert server.requests == [("300K_random_images.npy", None)]
  # Manifest writes of several names at once keep every entry (their own lock).
  threads = [threading.Thread(target=fetch._record, args=(
      dataclasses.replace(fetch.ENTRIES["energy_ood:300k_random_images"], name=f"n{i}"),
      fetch.cache_dir(), {"size": 1, "sha256": "x"}, "u", got[0])) for i in range(8)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  manifest = json.load(open(_cache("manifest.json")))
  assert {f"n{i}" for i in range(8)} <= set(manifest)


def test_a_web_page_in_place_of_an_archive_is_refused_and_not_recorded(server, monkeypatch):
  # Dropbox's ?dl=1 can answer 200 with an HTML page: recorded as LSUN-C's first download, its
  # SHA-256 would refuse every right download after it.
  _serve(server, monkeypatch, "energy_ood:lsun_c", b"<!DOCTYPE html><html><body>Too many "
         b"requests</body></html>" + b" " * 600)
  with pytest.raises(fetch.FetchError, match=r"energy_ood:lsun_c: the download from http://.*"
                     r"LSUN.tar.gz is not a gzip archive \(it starts with '<!DOCTYPE html>'\): "
                     r"the server sent a web page .*removed and nothing was recorded"):
    fetch.path("energy_ood:lsun_c")
  assert "energy_ood:lsun_c" not in fetch._read_manifest(fetch.cache_dir())
  assert sorted(os.listdir(_cache("downloads"))) == ["LSUN.tar.gz.lock"]
  pngs, tgz = _png_tar_gz()
  server.files["LSUN.tar.gz"] = tgz
  np.testing.assert_array_equal(sources.load("energy_ood:lsun_c", None, None).images,
                                np.stack(pngs))
  assert fetch._read_manifest(fetch.cache_dir())["energy_ood:lsun_c"]["sha256"] == (
      hashlib.sha256(tgz).hexdigest())
  # The other formats' first bytes.
  for name, data in (("energy_ood:300k_random_images", _npy()[1]),
                     ("energy_ood:places365", b"x" * 257 + b"ustar\x0000" + b"\0" * 300)):
    entry = fetch.ENTRIES[name]
    part = _cache("downloads", "probe.part")
    with open(part, "wb") as f:
      f.write(data)
    assert fetch._format_problem(entry, part) is None
    with open(part, "wb") as f:
      f.write(b"PK\x03\x04" + b"\0" * 600)
    assert "the server sent something else" in fetch._format_problem(entry, part)


def test_http_errors_and_no_network(server, monkeypatch):
  with pytest.raises(fetch.FetchError, match=r"energy_ood:isun: HTTP 404 .* from http://127.0.0.1"
                     r".*/iSUN.tar.gz: the file is not at that address"):
    fetch.path("energy_ood:isun")
  with socket.socket() as s:                 # a port nothing listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  monkeypatch.setenv(fetch.MIRROR_ENV, f"http://127.0.0.1:{port}")
  with pytest.raises(fetch.FetchError, match=r"energy_ood:isun: cannot reach http://127.0.0.1:"
                     r"\d+/iSUN.tar.gz \(.*refused.*\): check the network"):
    fetch.path("energy_ood:isun")
  assert not os.path.exists(_cache("downloads", "iSUN.tar.gz"))


def test_a_full_disk_keeps_the_part_for_resuming(server, monkeypatch):
  _, data = _npy()
  _serve(server, monkeypatch, "energy_ood:300k_random_images", data)
  monkeypatch.setattr(fetch, "CHUNK", 1024)
  real_open = open

  class Full:
    def __init__(self, f):
      self.f, self.n = f, 0

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

    def write(self, chunk):
      if self.n >= 2048:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      self.n += len(chunk)
      return self.f.write(chunk)

  monkeypatch.setattr(fetch, "open", lambda p, mode="r": Full(real_open(p, mode))
                      if mode in ("wb", "ab") else real_open(p, mode), raising=False)
  with pytest.raises(fetch.FetchError, match=r"energy_ood:300k_random_images: cannot write .*"
                     r"\.part \(No space left on device\) after 2048 bytes of http://.*: free "
                     r"space there, or set ENERGY_JAX_CACHE"):
    fetch.path("energy_ood:300k_random_images")
  assert os.path.getsize(_cache("downloads", "300K_random_images.npy.part")) == 2048
  monkeypatch.setattr(fetch, "open", real_open)            # the disk has room again
  assert open(fetch.path("energy_ood:300k_random_images"), "rb").read() == data
  assert server.requests[-1][1] == "bytes=2048-"


def test_the_authors_checkpoint_by_name_converted_once_then_read_without_torch(server,
                                                                                monkeypatch):
  torch = pytest.importorskip("torch")
  sys.path.insert(0, os.path.dirname(__file__))
  from torch_twin import TwinWRN, randomize_batchnorm
  from energy_jax import checkpoints, config as config_lib
  net = randomize_batchnorm(TwinWRN(10, 10, 1), torch.Generator().manual_seed(0))
  buf = io.BytesIO()
  torch.save(net.state_dict(), buf)
  _serve(server, monkeypatch, PT, buf.getvalue())
  c = config_lib.get_config("cifar10", "finetune")
  c.model.depth, c.model.widen_factor = 10, 1
  assert fetch.main(["get", PT]) == 0          # downloads; the conversion waits for a reader
  assert not os.path.exists(_cache("energy_ood", "cifar10_energy_ft", "orbax"))
  first = checkpoints.load_variables(PT, c)
  pt = _cache("downloads", "cifar10_wrn_s1_energy_ft_epoch_9.pt")
  direct = checkpoints.load_torch_checkpoint(pt, c)
  requests = len(server.requests)
  monkeypatch.setitem(sys.modules, "torch", None)            # `import torch` fails from here
  second = checkpoints.load_variables(PT, c)
  assert len(server.requests) == requests == 1
  import jax
  for a, b, d in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second),
                     jax.tree_util.tree_leaves(direct)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(d))
  assert os.path.isdir(_cache("energy_ood", "cifar10_energy_ft", "orbax", "checkpoints", "0"))
  with pytest.raises(fetch.FetchError, match="is a data set, not a checkpoint"):
    checkpoints.load_variables("energy_ood:lsun_c", c)


def test_with_several_processes_only_process_0_downloads_and_all_share_its_save(server,
                                                                               monkeypatch):
  # This process plays process 1 of 2: the cache is process 0's to look at and download into,
  # the Orbax save collective into the one folder process 0 names (its pid), the rename its.
  from energy_jax import checkpoints, config as config_lib, distributed
  monkeypatch.setattr(checkpoints, "_process_count", lambda: 2)
  monkeypatch.setattr(distributed, "is_main_process", lambda: False)
  said, flags, saves = {}, [], []
  monkeypatch.setattr(distributed, "from_main_process", lambda values: said["state"])
  monkeypatch.setattr(distributed, "any_process", lambda flag: flags.append(flag) or flag)
  monkeypatch.setattr(checkpoints, "_save_converted", lambda *args: saves.append(args[3:]))
  read = []
  monkeypatch.setattr(checkpoints, "load_torch_checkpoint", lambda pt, c: read.append(pt) or {})
  c = config_lib.get_config("cifar10", "finetune")
  run = _cache("energy_ood", "cifar10_energy_ft", "orbax")
  said["state"] = np.array([1, 4242])               # process 0 found it converted already
  assert checkpoints.fetched_run(PT, c) == run and not read and not saves and not flags
  said["state"] = np.array([2, 4242])               # process 0's download failed
  with pytest.raises(fetch.FetchError, match="process 0 could not download it"):
    checkpoints.fetched_run(PT, c)
  said["state"] = np.array([0, 4242])               # process 0 downloaded: convert together
  assert checkpoints.fetched_run(PT, c) == run
  assert read == [_cache("downloads", "cifar10_wrn_s1_energy_ft_epoch_9.pt")]
  assert saves == [(run, run + ".4242.tmp")] and flags == [False, False]   # then the barrier
  assert server.requests == [] and not os.path.exists(_cache("downloads"))
  # A process that cannot read the .pt says so to all before the save (else they would wait).
  monkeypatch.setattr(checkpoints, "load_torch_checkpoint", lambda pt, c: 1 / 0)
  with pytest.raises(fetch.FetchError, match="cannot convert .*ZeroDivisionError"):
    checkpoints.fetched_run(PT, c)
  assert flags[-1] is True and len(saves) == 1
  # As process 0: it downloads, and names its own pid's folder to all.
  monkeypatch.setattr(distributed, "is_main_process", lambda: True)
  monkeypatch.setattr(distributed, "from_main_process", lambda values: values)
  monkeypatch.setattr(checkpoints, "load_torch_checkpoint", lambda pt, c: {})
  _serve(server, monkeypatch, PT, b"PK\x03\x04 a stand-in .pt")
  assert checkpoints.fetched_run(PT, c) == run
  assert len(server.requests) == 1 and saves[-1] == (run, f"{run}.{os.getpid()}.tmp")


def test_the_paper_sets_and_the_scripts_take_the_names():
  from energy_jax.ood import protocol
  assert protocol.PAPER_OOD_SETS["lsun_c"].source == "energy_ood:lsun_c"
  for name in ("lsun_c", "lsun_r", "isun"):
    assert fetch.is_name(protocol.PAPER_OOD_SETS[name].source)
  from energy_jax import config as config_lib
  assert config_lib.missing_source("energy_ood:300k_random_images") is None
  with pytest.raises(fetch.FetchError, match="unknown fetch name 'energy_ood:nope'"):
    fetch.path("energy_ood:nope")


def test_the_scripts_path_checks_leave_names_to_the_loaders():
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
  import _main
  _main.check_local_path("energy_ood:cifar10_pretrained", "never shown")   # no exit
  with pytest.raises(SystemExit):
    _main.check_local_path("energy_ood:cifar10_pretrainedd", "no such run directory")


def test_the_cifar10_preset_fine_tunes_and_evaluates_on_what_it_fetches_by_name(
    server, monkeypatch, tmp_path):
  """The :cifar10 fine-tuning preset (its model shrunk, one short epoch on toy ID images) as it
  ships: the authors' pretrained weights, the 300K outliers and the six OOD sets of the paper
  come by name from the server; the run starts from the served weights, and the evaluation reads
  the same name as its checkpoint."""
  torch = pytest.importorskip("torch")
  sys.path.insert(0, os.path.dirname(__file__))
  from scipy import io as scipy_io
  from torch_twin import TwinWRN, randomize_batchnorm
  from energy_jax import checkpoints, config as config_lib, detectors, train
  from energy_jax.data import toy
  from energy_jax.ood import evaluation, protocol
  net = randomize_batchnorm(TwinWRN(10, 10, 1), torch.Generator().manual_seed(0))
  buf = io.BytesIO()
  torch.save(net.state_dict(), buf)
  _serve(server, monkeypatch, "energy_ood:cifar10_pretrained", buf.getvalue())
  outliers, data = _npy(64)
  _serve(server, monkeypatch, "energy_ood:300k_random_images", data)
  for name, top, mode in (("textures", "dtd/images", "w:gz"), ("places365", "val_256", "w"),
                          ("lsun_c", "LSUN", "w:gz"), ("lsun_r", "LSUN_resize", "w:gz"),
                          ("isun", "iSUN", "w:gz")):
    _serve(server, monkeypatch, f"energy_ood:{name}", _png_tar_gz(top=top, n=4, mode=mode)[1])
  mat = io.BytesIO()
  scipy_io.savemat(mat, {"X": np.random.default_rng(2).integers(0, 256, (32, 32, 3, 4),
                                                                  dtype=np.uint8),
                         "y": np.arange(1, 5)[:, None]})
  _serve(server, monkeypatch, "energy_ood:svhn", mat.getvalue())
  toy_id, _ = toy.make_toy_dataset(str(tmp_path / "toy"), num_classes=10, train_per_class=4,
                                   test_per_class=2, num_outliers=0)
  c = config_lib.get_config("cifar10", "finetune")
  assert c.outliers == "energy_ood:300k_random_images"
  c.in_train = c.in_test = toy_id
  c.pretrained = "energy_ood:cifar10_pretrained"
  c.epochs, c.num_devices, c.progress_bar, c.tensorboard = 1, 1, False, False
  c.batch_size, c.outlier_batch_size, c.steps_per_call, c.eval_batch_size = 8, 16, 1, 16
  c.model.depth, c.model.widen_factor, c.model.dropout_rate = 10, 1, 0.0
  row = train.train_and_evaluate(c, str(tmp_path / "run"), log=lambda s: None)
  assert np.isfinite(row["train_loss"])
  assert sorted(name for name, _ in server.requests) == ["300K_random_images.npy",
                                                          "cifar10_wrn_pretrained_epoch_99.pt"]
  assert np.array_equal(np.load(_cache("downloads", "300K_random_images.npy")), outliers)
  # The run started from the served state_dict: 5 steps at lr 0.001 move each weight tensor by
  # a few percent of its size at most (a fresh initialisation would differ by all of it).
  import jax
  served = checkpoints.load_torch_checkpoint(
      _cache("downloads", "cifar10_wrn_pretrained_epoch_99.pt"), c)
  tuned = checkpoints.load_variables(str(tmp_path / "run"), c)
  start, end = jax.tree_util.tree_leaves(served["params"]), jax.tree_util.tree_leaves(
      tuned["params"])
  assert len(start) == len(end)
  for a, b in zip(start, end):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < 0.05 * (np.abs(np.asarray(a)).max()
                                                                  + 1e-3)
  # The paper's table for the authors' model by name: the six sets fetched, the converted
  # checkpoint read without a second request for it.
  out = evaluation.run(c, "energy_ood:cifar10_pretrained", protocol.PAPER_OOD_SETS,
                       str(tmp_path / "eval"), [detectors.create("energy")], log=lambda s: None,
                       progress_bar=False)
  fetched = [name for name, _ in server.requests]
  assert fetched.count("cifar10_wrn_pretrained_epoch_99.pt") == 1
  assert len(fetched) == 2 + 6
  assert out["checkpoint"] == "energy_ood:cifar10_pretrained"
  table = out["results"]["energy (T=1)"]
  assert set(table) == set(protocol.PAPER_OOD_SETS) | {"mean"}
  for name in protocol.PAPER_OOD_SETS:
    assert 0.0 <= table[name]["auroc"] <= 1.0 and table[name]["num_ood"] == 20 // 5
