"""The converted-weights cache: convert once, memory-map afterwards, reconvert when needed."""

from __future__ import annotations

import os
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import save_file

from rwkv_cli import fileio
from rwkv_cli.loading import converted as weights_cache
from rwkv_cli.loading.checkpoint import load_checkpoint
from rwkv_cli.loading.converted import load_model_cached, source_hash
from rwkv_cli.loading.filerows import FileRows
from rwkv_cli.models import load_model
from rwkv_cli.paths import converted_dir
from tests.support.fixtures import rwkv7_tensors, write_pth

TOKENS = [1, 500, 2000, 11, 261]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("RWKV_CLI_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _logits(model) -> torch.Tensor:
    return model.forward(TOKENS)[0]


def test_first_load_converts_and_later_loads_skip_the_checkpoint(home, rwkv7_pth, monkeypatch):
    first = load_model_cached(rwkv7_pth)
    converted = list(converted_dir().glob("*.safetensors"))
    assert len(converted) == 1
    assert converted[0].name.endswith(f"-float32-v{weights_cache.LAYOUT_VERSION}.safetensors")
    umask = os.umask(0o022)
    os.umask(umask)
    assert converted[0].stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' own 0600

    def no_reading(path):
        raise AssertionError("the checkpoint was read again")

    monkeypatch.setattr(weights_cache, "load_checkpoint", no_reading)
    second = load_model_cached(rwkv7_pth)
    direct = load_model(rwkv7_pth)
    assert torch.equal(_logits(second), _logits(direct))
    assert torch.equal(_logits(first), _logits(direct))
    assert second.fingerprint == direct.fingerprint != ""


def test_a_changed_source_file_is_converted_again_replacing_its_copies(home, tmp_path, rwkv7_pth):
    other = load_model_cached(rwkv7_pth)  # another checkpoint's copy stays
    path = write_pth(tmp_path / "model.pth", rwkv7_tensors(seed=0))
    before = _logits(load_model_cached(path))
    load_model_cached(path, torch.bfloat16)  # the same contents in another dtype stay too
    assert len(list(converted_dir().glob("*.safetensors"))) == 3
    write_pth(path, rwkv7_tensors(seed=5))
    os.utime(path, ns=(1, 1))  # a different modification time, whatever the clock resolution
    after = _logits(load_model_cached(path))
    assert not torch.equal(before, after)
    assert torch.equal(after, _logits(load_model(path)))
    kept = {file.name.split("-")[0] for file in converted_dir().glob("*.safetensors")}
    assert kept == {source_hash(rwkv7_pth), source_hash(path)}  # the old contents' two went
    assert torch.equal(_logits(load_model_cached(rwkv7_pth)), _logits(other))


def test_copies_in_an_older_layout_are_deleted_by_the_next_conversion(home, rwkv7_pth):
    version = weights_cache.LAYOUT_VERSION
    older = converted_dir() / f"{'0' * 64}-float32-v{version - 1}.safetensors"
    newer = converted_dir() / f"{'1' * 64}-float32-v{version + 1}.safetensors"  # a newer install's
    older.parent.mkdir(parents=True)
    for path in (older, newer):
        save_file({"x": torch.zeros(1)}, path)
    load_model_cached(rwkv7_pth)
    assert not older.exists() and newer.exists()


def test_the_hash_is_computed_once_per_file_version(home, rwkv7_pth, monkeypatch):
    expected = source_hash(rwkv7_pth)
    monkeypatch.setattr(weights_cache.hashlib, "sha256", None)  # hashing again would fail
    assert source_hash(rwkv7_pth) == expected


def test_hugging_face_blobs_are_named_by_their_hash(home, tmp_path):
    digest = "ab" * 32
    blob = tmp_path / "models--x--y" / "blobs" / digest
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"not hashed")
    link = tmp_path / "model.pth"
    link.symlink_to(blob)
    assert source_hash(link) == digest


def test_a_corrupt_converted_file_is_rebuilt(home, rwkv7_pth):
    load_model_cached(rwkv7_pth)
    (converted,) = converted_dir().glob("*.safetensors")
    converted.write_bytes(converted.read_bytes()[:1000])
    model = load_model_cached(rwkv7_pth)
    assert torch.equal(_logits(model), _logits(load_model(rwkv7_pth)))
    assert converted.stat().st_size > 1000


def test_an_unwritable_cache_still_loads_with_a_warning(tmp_path, rwkv7_pth, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("RWKV_CLI_HOME", str(blocker))
    with pytest.warns(UserWarning, match="could not cache the converted model"):
        model = load_model_cached(rwkv7_pth)
    assert torch.equal(_logits(model), _logits(load_model(rwkv7_pth)))


def test_embedding_rows_are_read_from_the_converted_file(tmp_path) -> None:
    table = torch.randn(50, 12).to(torch.bfloat16)
    path = tmp_path / "table.safetensors"
    save_file({"before": torch.ones(7), "emb.weight": table}, path)
    rows = FileRows.of(path, "emb.weight", table)
    assert rows.shape == (50, 12) and rows.dtype == torch.bfloat16 and rows.nbytes == 50 * 24
    index = torch.tensor([3, 0, 49, 3])
    assert torch.equal(rows[index], table[index])
    assert rows[torch.tensor([], dtype=torch.long)].shape == (0, 12)
    with pytest.raises(IndexError):
        rows[torch.tensor([50])]
    path.write_bytes(path.read_bytes()[:-1200])  # truncated (mostly) after it was opened
    with pytest.raises(OSError, match="shorter"):
        rows[torch.tensor([49])]


def test_a_cached_model_reads_its_embedding_rows_from_the_file(rwkv7_pth) -> None:
    model = weights_cache.load_model_cached(rwkv7_pth)
    assert isinstance(model.embedding, FileRows)
    expected, _ = load_model(rwkv7_pth).forward([1, 2, 3])
    logits, _ = model.forward([1, 2, 3])
    assert torch.allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_too_little_disk_space_skips_the_cache_with_a_warning(home, rwkv7_pth, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.warns(UserWarning) as caught:
        model = load_model_cached(rwkv7_pth)
    (warning,) = [str(item.message) for item in caught]
    assert warning.startswith("could not cache the converted model: not enough disk space: ")
    assert "1.0 kB free in " in warning and "RWKV_CLI_HOME" in warning
    assert not list(converted_dir().glob("*.safetensors"))  # nothing half-written
    assert torch.equal(_logits(model), _logits(load_model(rwkv7_pth)))


def test_what_a_killed_conversion_left_is_cleared(home, rwkv7_pth):
    load_model_cached(rwkv7_pth)
    (cached,) = converted_dir().glob("*.safetensors")
    cached.unlink()
    leftover = cached.with_name(f".{cached.name}.k1ll3d.tmp")  # atomic_write's temporary folder
    leftover.mkdir()
    (leftover / ".tmpN5oovx").write_bytes(b"half a model")  # where safetensors was writing
    load_model_cached(rwkv7_pth)
    assert cached.is_file() and not leftover.exists()
    assert [path.name for path in converted_dir().iterdir() if path.name.startswith(".")] == []


def test_two_loaders_of_a_new_checkpoint_convert_it_once(home, rwkv7_pth, monkeypatch):
    reads = []

    def slow_read(path):
        reads.append(path)
        time.sleep(0.5)  # long enough for the other loader to arrive meanwhile
        return load_checkpoint(path)

    monkeypatch.setattr(weights_cache, "load_checkpoint", slow_read)
    with ThreadPoolExecutor(2) as pool:  # flock excludes threads too: each opens its own file
        models = list(pool.map(load_model_cached, [rwkv7_pth, rwkv7_pth]))
    assert len(reads) == 1
    assert torch.equal(_logits(models[0]), _logits(models[1]))
