"""The streaming safetensors writer writes what ``safetensors.torch.save_file`` writes, byte for byte, holding one
tensor at a time."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_compress_prompt.formats.safetensors_header import CheckpointError, parse_header
from hf_compress_prompt.formats.safetensors_stream import (
    entry_of,
    entry_of_chunks,
    read_rows,
    safetensors_dtype,
    write_safetensors,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64, torch.uint8, torch.int8, torch.bool,
          torch.int16, torch.float64]


def _random(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(int(torch.randint(1, 12, (), generator=g))):
        dtype = DTYPES[int(torch.randint(0, len(DTYPES), (), generator=g))]
        shape = tuple(int(s) for s in torch.randint(0, 5, (int(torch.randint(0, 4, (), generator=g)),), generator=g))
        values = torch.randn(shape, generator=g) * 50
        name = f"model.layers.{int(torch.randint(0, 20, (), generator=g))}.w{i}"
        tensors[name] = values > 0 if dtype is torch.bool else values.to(dtype)
    return tensors


@pytest.mark.parametrize("seed", range(12))
def test_bytes_equal_save_file(seed, tmp_path):
    tensors = _random(seed)
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    size = write_safetensors(tmp_path / "ours.safetensors", [entry_of(n, t) for n, t in tensors.items()],
                             {"format": "pt"})
    reference = (tmp_path / "reference.safetensors").read_bytes()
    assert (tmp_path / "ours.safetensors").read_bytes() == reference and size == len(reference)


def test_without_metadata_and_with_odd_names(tmp_path):
    tensors = {"é.ü": torch.arange(3.0), 'q"uote': torch.ones(2, 2, dtype=torch.bfloat16), "": torch.zeros(1)}
    save_file(tensors, tmp_path / "reference.safetensors")
    write_safetensors(tmp_path / "ours.safetensors", [entry_of(n, t) for n, t in tensors.items()])
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_lazy_tensors_are_made_one_at_a_time_in_file_order(tmp_path):
    made = []

    def maker(name, value):
        def make():
            made.append(name)
            return value
        return make

    tensors = {"b": torch.ones(4), "a": torch.ones(2, dtype=torch.int64), "c": torch.ones(3, dtype=torch.uint8)}
    entries = [entry_of(n, maker(n, t), dtype=t.dtype, shape=tuple(t.shape)) for n, t in tensors.items()]
    write_safetensors(tmp_path / "lazy.safetensors", entries, {"format": "pt"})
    assert made == ["a", "b", "c"]  # I64, F32, U8: safetensors' order, each made when written
    loaded = load_file(tmp_path / "lazy.safetensors")
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_a_tensor_unlike_its_announcement_is_refused(tmp_path):
    entry = entry_of("w", lambda: torch.ones(3), dtype=torch.float32, shape=(4,))
    with pytest.raises(ValueError, match="announced"):
        write_safetensors(tmp_path / "bad.safetensors", [entry])
    with pytest.raises(ValueError, match="duplicate"):
        write_safetensors(tmp_path / "dup.safetensors", [entry_of("w", torch.ones(1)), entry_of("w", torch.ones(1))])
    with pytest.raises(ValueError, match="no dtype"):
        safetensors_dtype(torch.complex64)


@pytest.mark.parametrize("rows_per_slice", [1, 3, 7, 100])
def test_a_tensor_written_in_slices_is_the_same_bytes(rows_per_slice, tmp_path):
    tensors = {"a": torch.randn(7, 5), "b": torch.arange(12, dtype=torch.int16).reshape(12), "c": torch.ones(4, 3, 2)}
    save_file(tensors, tmp_path / "reference.safetensors")
    entries = [entry_of_chunks(n, lambda t=t: iter(torch.split(t, rows_per_slice)), dtype=t.dtype, shape=tuple(t.shape))
               for n, t in tensors.items()]
    write_safetensors(tmp_path / "ours.safetensors", entries)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


@pytest.mark.parametrize("rows", [3, 5])
def test_slices_adding_up_to_another_size_are_refused(rows, tmp_path):
    t = torch.randn(rows, 2)
    entry = entry_of_chunks("a", lambda: iter(torch.split(t, 2)), dtype=t.dtype, shape=(4, 2))
    with pytest.raises(ValueError, match="announced 32"):
        write_safetensors(tmp_path / "bad.safetensors", [entry])


@pytest.mark.parametrize("seed", range(6))
def test_rows_read_from_a_file_equal_the_tensor_s(seed, tmp_path):
    tensors = {n: t for n, t in _random(seed).items() if t.dim() >= 1}
    save_file(tensors, tmp_path / "a.safetensors")
    for name, t in tensors.items():
        for start, stop in ((0, t.shape[0]), (1, 3), (2, 100)):
            torch.testing.assert_close(read_rows(tmp_path / "a.safetensors", name, start, stop), t[start:stop],
                                       rtol=0, atol=0)


def test_rows_of_a_damaged_file_are_refused_naming_it(tmp_path):
    """The rows reader reads by the checked header: a file cut short or with a corrupt header is a CheckpointError
    naming the file, not rows of garbage."""
    path = tmp_path / "a.safetensors"
    save_file({"a": torch.arange(64.0).reshape(8, 8), "b": torch.zeros(4)}, path)
    header = parse_header(path)
    assert header.tensors["a"].shape == (8, 8) and header.tensors["a"].dtype == "F32"
    torch.testing.assert_close(read_rows(path, "a", 2, 4, header), torch.arange(16.0, 32.0).reshape(2, 8))
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match=r"a\.safetensors: truncated safetensors file"):
        read_rows(path, "a", 0, 2)
    path.write_bytes(b"\x10" + b"\0" * 7 + b"not json at all!")
    with pytest.raises(CheckpointError, match=r"a\.safetensors: corrupt safetensors header"):
        read_rows(path, "a", 0, 2)
