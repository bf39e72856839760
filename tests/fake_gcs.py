"""A Cloud Storage bucket faked by a local folder, at the two places a run reaches ``gs://``.

- etils.epath (the run's own files): ``gs://`` goes to fsspec (as without TensorFlow), where
  ``gs`` is registered as a :class:`DirFileSystem` over the folder: ``gs://bucket/x`` is
  ``<root>/bucket/x``, and listings name ``bucket/x`` as gcsfs's do.
- Orbax: its ``gs://`` code runs as on a bucket (commit-file atomicity instead of renames,
  deletes through its GCS helper), while TensorStore's kvstore for a ``gs://`` path is the file
  driver at the same local folder, and the bucket is not a hierarchical-namespace one (what
  Orbax asks google-cloud-storage, which energy-jax then need not find).
"""

import importlib
import os

import pytest
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem


class FolderBucket(DirFileSystem):
  protocol = ("gs", "gcs")
  cachable = False                    # each test's root is its own
  root = None

  def __init__(self, *args, **kwargs):   # gcsfs's options (finalize_on_close, ...) are ignored
    super().__init__(path=type(self).root, fs=LocalFileSystem())

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        path = path[len(prefix):]
    return path.rstrip("/")


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """The local folder that holds the faked buckets (``gs://bucket/x`` -> ``<folder>/bucket/x``);
  the test runs in another folder, so that nothing written to a literal ``gs:`` path hides."""
  from etils.epath import backend, gpath
  from orbax.checkpoint._src.path import gcs_utils
  from energy_jax import storage
  root = tmp_path / "buckets"
  root.mkdir()
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)   # (a cached check) -> fsspec
  monkeypatch.setattr(FolderBucket, "root", str(root))
  registry = importlib.import_module("fsspec.registry")._registry   # restored after the test
  for name in ("gs", "gcs"):
    monkeypatch.setitem(registry, name, FolderBucket)
  backend.fsspec_backend._get_filesystem.cache_clear()

  def file_kvstore(path):
    bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
    return {"driver": "file", "path": str(root / bucket / key)}
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", file_kvstore)
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  monkeypatch.setattr(storage, "require_bucket_client", lambda path, what: None)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield root
  backend.fsspec_backend._get_filesystem.cache_clear()
  assert os.listdir(cwd) == [], "something wrote a gs:// path as a local one"
