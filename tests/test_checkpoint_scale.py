"""Checkpoints at any size: sharded folders read through their index, tensors and offsets past 2 GiB, and
extraction from bf16 / fp16 sharded pairs matching a float32 reference."""

from __future__ import annotations

import json
import os
import resource
import struct

import numpy as np
import pytest
import torch

from safegene.adapter.checkpoint import INDEX_FILE, LazyCheckpoint
from safegene.errors import ModelError

# --- (a) sharded checkpoints ----------------------------------------------------------------------------------------


def save_sharded(sd: dict[str, torch.Tensor], folder, n_shards: int, offset: int = 0, config: dict | None = None):
    """Save `sd` as n_shards files plus the HF index; tensor i goes to shard (i + offset) % n_shards, so two
    checkpoints saved with different offsets hold the same tensor in different files."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(sd)
    shard_of = {n: (i + offset) % n_shards for i, n in enumerate(names)}
    weight_map = {}
    for s in range(n_shards):
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: sd[n].contiguous() for n in names if shard_of[n] == s}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def sharded(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {f"layer.{i}.w": torch.randn(5 + i, 3, generator=g) for i in range(7)}
    sd["emb"] = torch.randn(11, 4, generator=g).to(torch.bfloat16)
    return save_sharded(sd, tmp_path / "ck", 3), sd


def test_sharded_checkpoint_reads_every_tensor_by_name_through_the_index(sharded):
    from safetensors.torch import save_file

    folder, sd = sharded
    # a stale file from an earlier save that reuses a tensor name: the index does not name it, so it is never read
    save_file({"layer.0.w": torch.full((5, 3), 99.0)}, str(folder / "model-00001-of-00002.safetensors"))
    with LazyCheckpoint(folder) as ck:
        assert sorted(ck.keys()) == sorted(sd)
        assert [p.name for p in ck.files()] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        for name, t in sd.items():
            got = ck.get(name)
            assert got.dtype == t.dtype and torch.equal(got, t), name
        assert torch.equal(ck.get_rows("layer.6.w", 2, 9), sd["layer.6.w"][2:9])
        blocks = list(ck.row_blocks("layer.6.w", max_bytes=3 * 3 * 4))  # 3 rows of 3 float32 per block
        assert [a for a, _ in blocks] == [0, 3, 6, 9] and torch.equal(torch.cat([b for _, b in blocks]), sd["layer.6.w"])


def test_missing_shard_names_the_file_and_the_fix(sharded):
    folder, _ = sharded
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ModelError) as e:
        LazyCheckpoint(folder)
    msg = str(e.value)
    assert "\n" not in msg and "model-00002-of-00003.safetensors: missing" in msg
    assert INDEX_FILE in msg and "download every shard" in msg


def test_index_name_absent_from_its_shard_names_index_tensor_shard_and_fix(sharded):
    folder, _ = sharded
    index = json.loads((folder / INDEX_FILE).read_text())
    index["weight_map"]["layer.9.w"] = "model-00001-of-00003.safetensors"
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ModelError) as e:
        LazyCheckpoint(folder)
    msg = str(e.value)
    assert "\n" not in msg and str(folder / INDEX_FILE) in msg and "'layer.9.w'" in msg
    assert "model-00001-of-00003.safetensors" in msg and "re-download" in msg


@pytest.mark.parametrize("text, problem", [("{oops", "invalid JSON"), ('{"metadata": {}}', "weight_map"),
                                           ('{"weight_map": {"w": "../x.safetensors"}}', "not a .safetensors file")])
def test_damaged_index_is_a_one_line_error(sharded, text, problem):
    folder, _ = sharded
    (folder / INDEX_FILE).write_text(text)
    with pytest.raises(ModelError, match=problem) as e:
        LazyCheckpoint(folder)
    assert INDEX_FILE in str(e.value) and "\n" not in str(e.value)


def test_single_file_wins_over_an_index_as_in_transformers(sharded):
    from safetensors.torch import save_file

    folder, _ = sharded
    save_file({"only": torch.ones(2)}, str(folder / "model.safetensors"))
    with LazyCheckpoint(folder) as ck:
        assert ck.keys() == ["only"]


# --- (b) past 2 GiB, in a sparse file ------------------------------------------------------------------------------

COLS = 1024
ROWS = 2**19 + 2  # 2 GiB + 8 KiB of float32
BIG_START = 16  # "big" starts after the 16 bytes of "head"
MARK_ROWS = {  # row -> what is written there; every other byte of the tensor is a hole (reads as zeros)
    0: np.arange(COLS, dtype=np.float32) + 1,
    2**19 - 1: np.arange(COLS, dtype=np.float32) * -0.5,  # ends exactly 2 GiB into the tensor's data
    2**19: np.full(COLS, 3.25, dtype=np.float32),         # starts 2 GiB into the tensor's data
    ROWS - 1: np.linspace(-7, 7, COLS, dtype=np.float32),
}
HEAD = np.array([1.5, -2.0, 4.0, 8.0], dtype=np.float32)
TAIL = np.arange(8, dtype=np.float32) * 10 - 3


@pytest.fixture(scope="module")
def sparse_checkpoint(tmp_path_factory):
    """A safetensors file of 2 GiB + 8 KiB written by hand as a sparse file: only the marked rows take disk space."""
    folder = tmp_path_factory.mktemp("sparse")
    big_bytes = ROWS * COLS * 4
    header = {"head": {"dtype": "F32", "shape": [4], "data_offsets": [0, BIG_START]},
              "big": {"dtype": "F32", "shape": [ROWS, COLS], "data_offsets": [BIG_START, BIG_START + big_bytes]},
              "tail": {"dtype": "F32", "shape": [8], "data_offsets": [BIG_START + big_bytes, BIG_START + big_bytes + 32]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data_start = 8 + len(raw)
    path = folder / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.write(HEAD.tobytes())
        for row, values in MARK_ROWS.items():
            f.seek(data_start + BIG_START + row * COLS * 4)
            f.write(values.tobytes())
        f.seek(data_start + BIG_START + big_bytes)
        f.write(TAIL.tobytes())
    size = path.stat().st_size
    assert size == data_start + BIG_START + big_bytes + 32 and size > 2**31
    if path.stat().st_blocks * 512 > 64 * 2**20:
        pytest.skip("this file system does not keep sparse files sparse")
    return folder, data_start


def test_tensor_offsets_past_2_gib_read_exactly(sparse_checkpoint):
    folder, data_start = sparse_checkpoint
    with LazyCheckpoint(folder) as ck:
        assert ck.shape("big") == (ROWS, COLS) and ck.nbytes("big") == 2**31 + 8192
        assert np.array_equal(ck.get("head").numpy(), HEAD)
        assert np.array_equal(ck.get("tail").numpy(), TAIL)  # starts 2 GiB + 8 KiB + 16 B into the data
        # rows around the tensor's own 2 GiB point, and around the file's 2 GiB offset
        got = ck.get_rows("big", 2**19 - 2, 2**19 + 2).numpy()
        assert np.array_equal(got[0], np.zeros(COLS, np.float32))
        assert np.array_equal(got[1], MARK_ROWS[2**19 - 1]) and np.array_equal(got[2], MARK_ROWS[2**19])
        file_row = (2**31 - data_start - BIG_START) // (COLS * 4)  # the row that holds file offset 2**31
        assert file_row == 2**19 - 1 and (data_start + BIG_START + (file_row + 1) * COLS * 4) > 2**31
        assert np.array_equal(ck.get_rows("big", file_row, file_row + 1).numpy()[0], MARK_ROWS[file_row])
        assert np.array_equal(ck.get_rows("big", ROWS - 1, ROWS).numpy()[0], MARK_ROWS[ROWS - 1])
        assert np.array_equal(ck.get_rows("big", 0, 1).numpy()[0], MARK_ROWS[0])


def test_positioned_read_loop_with_a_small_chunk_crosses_2_gib(sparse_checkpoint):
    """The loop that continues short reads, driven by a 4 KiB chunk over the last 12 rows (48 KiB), which straddle the
    tensor's and the file's 2 GiB offsets and end at the end of the tensor."""
    folder, data_start = sparse_checkpoint
    with LazyCheckpoint(folder) as ck:
        f = ck._file("big")
        first = ROWS - 12
        buf = np.empty(12 * COLS, dtype=np.float32)
        f._read_into(memoryview(buf).cast("B"), data_start + BIG_START + first * COLS * 4, "big", chunk=4096)
        rows = buf.reshape(12, COLS)
        assert np.array_equal(rows[9], MARK_ROWS[2**19 - 1]) and np.array_equal(rows[10], MARK_ROWS[2**19])
        assert np.array_equal(rows[11], MARK_ROWS[ROWS - 1]) and not rows[:9].any()
        # one row more runs past the tensor into "tail" and then off the end of the file: a clear error, no hang
        over = np.empty(13 * COLS, dtype=np.float32)
        with pytest.raises(ModelError, match="truncated"):
            f._read_into(memoryview(over).cast("B"), data_start + BIG_START + first * COLS * 4, "big", chunk=4096)


def test_a_pass_over_a_2_gib_tensor_in_blocks_stays_small(sparse_checkpoint):
    folder, _ = sparse_checkpoint
    expected = sum(float(v.astype(np.float64).sum()) for v in MARK_ROWS.values())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    total, rows, biggest = 0.0, 0, 0
    with LazyCheckpoint(folder) as ck:
        for start, block in ck.row_blocks("big", max_bytes=32 * 2**20):
            assert start == rows
            rows += block.shape[0]
            biggest = max(biggest, block.numel() * 4)
            total += float(block.sum(dtype=torch.float64))
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert rows == ROWS and biggest <= 32 * 2**20
    assert total == pytest.approx(expected, rel=1e-12)
    assert grew < 256 * 2**20, f"peak RSS grew by {grew / 2**20:.0f} MB reading a 2 GiB tensor in 32 MB blocks"


@pytest.mark.skipif(os.environ.get("SAFEGENE_LARGE_TESTS") != "1",
                    reason="materialises 2 GiB; set SAFEGENE_LARGE_TESTS=1 to run")
def test_whole_2_gib_tensor_reads_in_one_get(sparse_checkpoint):
    """One `get` of 2 GiB + 8 KiB: a single positioned read returns at most 0x7ffff000 bytes on Linux."""
    folder, _ = sparse_checkpoint
    with LazyCheckpoint(folder) as ck:
        big = ck.get("big")
        assert big.shape == (ROWS, COLS) and big.dtype == torch.float32
        for row, values in MARK_ROWS.items():
            assert np.array_equal(big[row].numpy(), values), row
        # nothing else was read into it (count_nonzero: a float64 sum would make a 4 GiB copy)
        assert int(torch.count_nonzero(big)) == sum(int(np.count_nonzero(v)) for v in MARK_ROWS.values())


# --- (c) bf16 / fp16 sharded pairs ---------------------------------------------------------------------------------

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def pair_state():
    """A (a tiny qwen2's weights) and D = A - a rank-2 update on every target module, in float32, plus its config."""
    from tiny import make_model

    model, _ = make_model(layers=2, hidden=64)
    a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    d = {}
    for k, w in a.items():
        if w.ndim == 2 and any(f".{t}." in k for t in TARGETS):
            u, v = torch.randn(w.shape[0], 2, generator=g), torch.randn(2, w.shape[1], generator=g)
            d[k] = w - 0.05 * (u @ v)
        else:
            d[k] = w.clone()
    return a, d, model.config.to_dict()


def _extract(a_dir, d_dir, out):
    from safegene.adapter import extract_adapter
    from safegene.adapter.extract import ExtractConfig

    cfg = ExtractConfig(aligned=str(a_dir), degraded=str(d_dir), output=str(out), rank=4, svd="exact")
    return extract_adapter(cfg, progress=False, save=False)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 1.5e-3)])
def test_low_precision_sharded_pair_matches_float32_reference(tmp_path, pair_state, dtype, tol):
    a, d, config = pair_state
    ref = _extract(save_sharded(a, tmp_path / "a32", 1, config=config), save_sharded(d, tmp_path / "d32", 1, config=config),
                   tmp_path / "o")
    # A in 3 shards, D in 4 and laid out differently: only matching by name can pair the tensors
    a_dir = save_sharded({k: v.to(dtype) for k, v in a.items()}, tmp_path / "a", 3, config=config)
    d_dir = save_sharded({k: v.to(dtype) for k, v in d.items()}, tmp_path / "d", 4, offset=1, config=config)
    low = _extract(a_dir, d_dir, tmp_path / "o")
    assert sorted(low.factors) == sorted(ref.factors) and len(low.factors) == 2 * len(TARGETS)
    worst = 0.0
    for m, (fa, fb) in low.factors.items():
        assert fa.dtype == torch.float32 and fb.dtype == torch.float32  # factors (and the SVD) in float32
        ra, rb = ref.factors[m]
        delta_ref = rb @ ra
        err = float((fb @ fa - delta_ref).norm() / delta_ref.norm())
        worst = max(worst, err)
        # the float32 reference recovers the exact rank-2 update
        assert float((delta_ref - (a[m + ".weight"] - d[m + ".weight"])).norm()) < 1e-4 * float(delta_ref.norm())
    assert worst < tol, f"{dtype}: worst relative error {worst:.2e} vs float32 reference"
    assert worst > 0  # it really read the rounded weights
    assert low.card["untracked_drift"] == {}  # embeddings and norms identical in A and D
    assert sorted(low.card["input_sha256"]["aligned"]) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert len(low.card["input_sha256"]["degraded"]) == 4
