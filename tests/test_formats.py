"""Malformed and hostile files: each is read exactly as the safetensors library reads it, or refused with one
line naming the file and why (a SourceError; the CLI prints it and exits 2). Nothing blocks, nothing crashes."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from chatvec_lab import ChatVector, open_weights
from chatvec_lab.cli import main
from chatvec_lab.errors import SourceError
from chatvec_lab.io.sources import SafetensorsSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fuzz_headers  # noqa: E402  (the fuzz generator, shared with benchmarks/fuzz_headers.py)
from fuzz_headers import library_reads, time_limit  # noqa: E402


# ------------------------------------------------------------------ fixtures, built by hand

def tiny_file(path: Path, tensors: dict | None = None) -> Path:
    tensors = {"a": torch.arange(4, dtype=torch.float32), "b": torch.arange(6, dtype=torch.int16).reshape(2, 3)} \
        if tensors is None else tensors
    save_file(tensors, path)
    return path


def split(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (as JSON) and data section."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    """A file of ``header`` (an object, or its bytes verbatim) and ``data``, with a given or correct length."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + data)
    return path


def rewritten(tmp_path: Path, change, name: str = "bad.safetensors") -> Path:
    """A tiny valid file whose header ``change(header, data)`` rewrote; it returns a new (header, data) or None."""
    header, data = split(tiny_file(tmp_path / "good.safetensors"))
    changed = change(header, data)
    header, data = changed if changed is not None else (header, data)
    return write(tmp_path / name, header, data)


def read_all(spec) -> dict[str, torch.Tensor]:
    source = open_weights(spec)
    return {name: source.get(name) for name in source.keys()}


def assert_refused(path, capsys, match: str, read=read_all, command: str = "info") -> None:
    """``read(path)`` raises a one-line SourceError naming the file and matching ``match``; ``chatvec command``
    exits 2 with exactly one line on stderr."""
    with time_limit(10):
        with pytest.raises(SourceError, match=match) as caught:
            read(path)
        assert "\n" not in str(caught.value) and str(path) in str(caught.value)
        capsys.readouterr()
        assert main([command, str(path), "-q"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err


def library_refuses(path: Path) -> bool:
    return library_reads(path) is None


# ------------------------------------------------------------------ 1. data_offsets

def _first(header):
    return header["a"] if header["a"]["data_offsets"][0] == 0 else header["b"]


def _second(header):
    return header["b"] if header["a"]["data_offsets"][0] == 0 else header["a"]


HOSTILE_OFFSETS = {
    "negative": (lambda h, d: _first(h).update(data_offsets=[-16, -16 + _span(_first(h))]), "data_offsets"),
    "overlapping": (lambda h, d: _second(h).update(data_offsets=[0, _span(_second(h))]), "overlaps"),
    "gap": (lambda h, d: (_shift(h, 4), b"\0" * 4 + d), "gap"),
    "trailing bytes": (lambda h, d: (h, d + b"\0" * 8), "trailing bytes"),
    "past the end": (lambda h, d: (h, d[:-2]), "truncated safetensors file"),
    "reversed": (lambda h, d: _first(h).update(data_offsets=_first(h)["data_offsets"][::-1]), "begin <= end"),
    "span not shape x dtype": (lambda h, d: _first(h).update(shape=[1]), "spans"),
    "three offsets": (lambda h, d: _first(h)["data_offsets"].append(8), "data_offsets"),
    "float offsets": (lambda h, d: _first(h).update(data_offsets=[0.0, float(_span(_first(h)))]), "data_offsets"),
    "bool offset": (lambda h, d: _first(h).update(data_offsets=[False, _span(_first(h))]), "data_offsets"),
    "string offset": (lambda h, d: _first(h).update(data_offsets=["0", _span(_first(h))]), "data_offsets"),
    "huge offset": (lambda h, d: _first(h).update(data_offsets=[2**64, 2**64 + _span(_first(h))]), "data_offsets"),
}


def _span(entry) -> int:
    return entry["data_offsets"][1] - entry["data_offsets"][0]


def _shift(header, k):
    for name in ("a", "b"):
        header[name]["data_offsets"] = [o + k for o in header[name]["data_offsets"]]
    return header


@pytest.mark.parametrize("case", list(HOSTILE_OFFSETS))
def test_hostile_offsets_are_refused_as_the_library_refuses_them(tmp_path, capsys, case):
    change, match = HOSTILE_OFFSETS[case]
    path = rewritten(tmp_path, change)
    assert library_refuses(path)
    assert_refused(path, capsys, match)


# ------------------------------------------------------------------ 3. the header's JSON structure

ENTRY = b'"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
MALFORMED_HEADERS = {
    "a list": (b"[]", "the header is a list"),
    "a string": (b'"header"', "the header is a string"),
    "a number": (b"8", "the header is an integer"),
    "entry a list": (b'{"a":["F32",[0],[0,0]]}', "is a list, not an object"),
    "entry null": (b'{"a":null}', "is null, not an object"),
    "no dtype": (b'{"a":{"shape":[0],"data_offsets":[0,0]}}', "has no dtype"),
    "dtype a number": (b'{"a":{"dtype":4,"shape":[0],"data_offsets":[0,0]}}', "unknown dtype 4"),
    "unknown dtype": (b'{"a":{"dtype":"f32","shape":[0],"data_offsets":[0,0]}}', "corrupt .* unknown dtype 'f32'"),
    "float shape": (b'{"a":{"dtype":"F32","shape":[0.0],"data_offsets":[0,0]}}', "shape"),
    "bool shape": (b'{"a":{"dtype":"F32","shape":[false],"data_offsets":[0,0]}}', "shape"),
    "negative shape": (b'{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}}', "shape"),
    "minus zero shape": (b'{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', "shape"),
    "shape an object": (b'{"a":{"dtype":"F32","shape":{"0":0},"data_offsets":[0,0]}}', "shape"),
    "shape overflows": (b'{"a":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}',
                        "too large"),
    "metadata a list": (b'{"__metadata__":[],' + ENTRY + b"}", "__metadata__"),
    "metadata not strings": (b'{"__metadata__":{"k":1},' + ENTRY + b"}", "__metadata__"),
    "duplicate tensor": (b"{" + ENTRY + b"," + ENTRY + b"}", "duplicate key 'a'"),
    "duplicate field": (b'{"a":{"dtype":"F32","dtype":"F32","shape":[0],"data_offsets":[0,0]}}', "duplicate key"),
    "NaN": (b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,0]}}', "NaN"),
    "Infinity": (b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":Infinity}}', "Infinity"),
    "number out of range": (b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":1e999}}', "out of range"),
    "not UTF-8": (b'{"\xff":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}', "utf-8"),
    "lone surrogate": (b'{"\\ud800":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}', "surrogate"),
    "byte order mark": (b"\xef\xbb\xbf{}", "BOM"),
    "nested 128 deep": (b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":' + b"[" * 126 + b"]" * 126
                        + b"}}", "nested"),
    "nested 100000 deep": (b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    "padded with NUL": (b"{}\0\0", "Extra data"),
    "not JSON": (b"{not json at all", "corrupt"),
}


@pytest.mark.parametrize("case", list(MALFORMED_HEADERS))
def test_malformed_headers_are_refused_as_the_library_refuses_them(tmp_path, capsys, case):
    text, match = MALFORMED_HEADERS[case]
    path = write(tmp_path / "bad.safetensors", text)
    stricter_on_purpose = case in ("entry a list", "duplicate tensor")  # the library reads these
    assert library_refuses(path) != stricter_on_purpose
    assert_refused(path, capsys, match)


@pytest.mark.parametrize("length, match", [(0, "header length 0"), (2**64 - 1, "header length"),
                                           (100_000_001, "header length"), (10_000, "does not fit a file")])
def test_header_lengths_that_do_not_fit_are_refused(tmp_path, capsys, length, match):
    path = write(tmp_path / "bad.safetensors", b"{}" + b" " * 6, length=length)
    assert library_refuses(path)
    assert_refused(path, capsys, match)


def test_files_shorter_than_the_length_field_are_refused(tmp_path, capsys):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01")
    assert_refused(path, capsys, "corrupt safetensors file .*shorter than the 8-byte header length")


# legal, if unusual: each must be read exactly as the library reads it
LEGAL_HEADERS = {
    "padded with spaces": lambda h, d: (json.dumps(h).encode() + b" " * 13, d),
    "padded with whitespace": lambda h, d: (b" \n" + json.dumps(h).encode() + b"\t\r ", d),
    "empty": lambda h, d: (b"{}", b""),
    "empty, padded": lambda h, d: (b"{}      ", b""),
    "metadata null": lambda h, d: ({**h, "__metadata__": None}, d),
    "metadata strings": lambda h, d: ({**h, "__metadata__": {"format": "pt", "x": ""}}, d),
    "zero-size tensors": lambda h, d: ({**h, "z": {"dtype": "F16", "shape": [0, 3], "data_offsets": [0, 0]},
                                        "y": {"dtype": "I8", "shape": [2, 0], "data_offsets": [len(d), len(d)]}}, d),
    "scalar": lambda h, d: ({"s": {"dtype": "F64", "shape": [], "data_offsets": [0, 8]}}, d[:8]),
    "entries out of order": lambda h, d: (dict(reversed(list(h.items()))), d),
    "extra fields": lambda h, d: ({k: {**v, "note": [1, {"x": None}]} for k, v in h.items()}, d),
    "escaped name": lambda h, d: (json.dumps(h).replace('"a"', '"\\u0061\\u00fc"').encode(), d),
    "same-size dtype": lambda h, d: ({**h, "b": {**h["b"], "dtype": "BF16"}}, d),
    "nested 127 deep": lambda h, d: ({"a": {**h["a"], "x": json.loads("[" * 125 + "]" * 125)}, "b": h["b"]}, d),
    "huge zero-size": lambda h, d: ({**h, "z": {"dtype": "F32", "shape": [2**62, 0], "data_offsets": [0, 0]}}, d),
}


@pytest.mark.parametrize("case", list(LEGAL_HEADERS))
def test_legal_headers_are_read_as_the_library_reads_them(tmp_path, case):
    path = rewritten(tmp_path, LEGAL_HEADERS[case])
    expected = library_reads(path)
    assert expected is not None, "the library reads this file"
    assert {name: fuzz_headers._contents(t) for name, t in read_all(path).items()} == expected


def test_unsupported_dtypes_say_so_unknown_ones_say_corrupt(tmp_path, capsys):
    for dtype, nbytes in [("U16", 4), ("U32", 8), ("U64", 16), ("C64", 16), ("F8_E8M0", 2), ("F8_E4M3FNUZ", 2),
                          ("F8_E5M2FNUZ", 2), ("F4", 1), ("F6_E2M3", 3), ("F6_E3M2", 3)]:
        shape = [2] if dtype[:2] not in ("F4", "F6") else [4 if dtype.startswith("F6") else 2]
        path = write(tmp_path / f"{dtype}.safetensors",
                     {"w": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}, b"\0" * nbytes)
        with pytest.raises(SourceError, match=f"tensor 'w' has unsupported dtype {dtype}") as caught:
            open_weights(path)
        assert "corrupt" not in str(caught.value) and str(path) in str(caught.value)
    assert_refused(tmp_path / "U16.safetensors", capsys, "unsupported dtype U16")
    bogus = write(tmp_path / "bogus.safetensors", {"w": {"dtype": "U128", "shape": [1], "data_offsets": [0, 16]}},
                  b"\0" * 16)
    assert_refused(bogus, capsys, "corrupt safetensors file .*unknown dtype 'U128'")


# ------------------------------------------------------------------ 4. only regular files

def test_fifos_devices_and_directories_are_refused_without_blocking(tmp_path, capsys):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    assert_refused(fifo, capsys, "fifo.safetensors is a FIFO, not a regular file")
    device = tmp_path / "device.safetensors"
    device.symlink_to("/dev/zero")
    assert_refused(device, capsys, "device.safetensors is a character device, not a regular file")

    for kind in ("fifo", "directory"):  # a shard in a folder, found by its name
        folder = tmp_path / f"folder-{kind}"
        folder.mkdir()
        tiny_file(folder / "model-1.safetensors")
        (os.mkfifo if kind == "fifo" else os.mkdir)(folder / "model-2.safetensors")
        assert_refused(folder, capsys, f"model-2.safetensors is a {'FIFO' if kind == 'fifo' else kind}")

    folder = tmp_path / "fifo-index"  # an index that is a FIFO
    folder.mkdir()
    tiny_file(folder / "model.safetensors")
    os.mkfifo(folder / "model.safetensors.index.json")
    assert_refused(folder, capsys, "model.safetensors.index.json is a FIFO")

    folder = tmp_path / "fifo-config"  # config.json, read by the config property
    folder.mkdir()
    tiny_file(folder / "model.safetensors")
    os.mkfifo(folder / "config.json")
    assert_refused(folder, capsys, "config.json is a FIFO", read=lambda p: open_weights(p).config)

    link = tmp_path / "link.safetensors"  # a symlink to a regular file is fine
    link.symlink_to(tiny_file(tmp_path / "real.safetensors"))
    assert torch.equal(read_all(link)["a"], torch.arange(4, dtype=torch.float32))


def test_a_file_swapped_after_opening_is_never_read_and_a_fifo_never_opened(tmp_path, monkeypatch):
    from chatvec_lab.io.formats import open_regular

    path = tiny_file(tmp_path / "m.safetensors")
    source = SafetensorsSource([path])
    path.unlink()
    os.mkfifo(path)  # replaced after opening: the source reads the file it opened, never the FIFO
    with time_limit(10):
        assert torch.equal(source.get("a"), torch.arange(4, dtype=torch.float32))
    regular, real_stat = tiny_file(tmp_path / "regular.safetensors"), os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: real_stat(regular if Path(p) == path else p, *a, **k))
    with time_limit(10), pytest.raises(SourceError, match="m.safetensors is a FIFO, not a regular file"):
        open_regular(path)  # the stat saw a file; the open descriptor is a FIFO


# ------------------------------------------------------------------ 2. the shard index

M1, M2 = "model-1.safetensors", "model-2.safetensors"


def sharded(folder: Path, weight_map=None, index=None) -> Path:
    """Two shards and an index: ``weight_map`` or a whole ``index`` (any JSON) written verbatim if given."""
    folder.mkdir()
    tiny_file(folder / M1, {"a": torch.ones(2), "c": torch.ones(1)})
    tiny_file(folder / M2, {"b": torch.zeros(3)})
    weight_map = {"a": M1, "c": M1, "b": M2} if weight_map is None else weight_map
    index = {"metadata": {}, "weight_map": weight_map} if index is None else index
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


BAD_INDEXES = {
    "parent folder": (dict(weight_map={"a": "../outside.safetensors", "c": M1, "b": M2}),
                      "'../outside.safetensors', not the name of a file in the index's folder"),
    "absolute path": (dict(weight_map={"a": "/tmp/x.safetensors", "c": M1, "b": M2}), "not the name"),
    "subfolder": (dict(weight_map={"a": "sub/" + M1, "c": M1, "b": M2}), "not the name"),
    "backslash": (dict(weight_map={"a": "..\\" + M1, "c": M1, "b": M2}), "not the name"),
    "dot dot": (dict(weight_map={"a": "..", "c": M1, "b": M2}), "not the name"),
    "dot": (dict(weight_map={"a": ".", "c": M1, "b": M2}), "not the name"),
    "empty name": (dict(weight_map={"a": "", "c": M1, "b": M2}), "not the name"),
    "NUL": (dict(weight_map={"a": M1 + "\0", "c": M1, "b": M2}), "not the name"),
    "shard a number": (dict(weight_map={"a": 1, "c": M1, "b": M2}), "mapped to 1"),
    "weight_map a list": (dict(weight_map=[M1, M2]), "weight_map is a list"),
    "no weight_map": (dict(index={"metadata": {}}), "weight_map is missing"),
    "index a list": (dict(index=[{"weight_map": {}}]), "bad shard index .* expected a JSON object, found a list"),
    "index a string": (dict(index=M1), "found a string"),
    "tensor the shard lacks": (dict(weight_map={"a": M1, "c": M1, "b": M2, "d": M2}),
                               "puts tensor 'd' in model-2.safetensors, which does not hold it"),
    "tensor in the other shard": (dict(weight_map={"a": M1, "c": M1, "b": M1, "x": M2}),
                                  "puts tensor 'b' in model-1.safetensors, but it is in model-2.safetensors"),
    "tensor the index does not name": (dict(weight_map={"a": M1, "b": M2}),
                                       "model-1.safetensors holds tensor 'c', which .* does not name"),
    "missing shard": (dict(weight_map={"a": M1, "c": M1, "b": "model-3.safetensors"}),
                      "names shard model-3.safetensors, which is missing"),
}


@pytest.mark.parametrize("case", list(BAD_INDEXES))
def test_bad_shard_indexes_are_refused(tmp_path, capsys, case):
    kwargs, match = BAD_INDEXES[case]
    tiny_file(tmp_path / "outside.safetensors", {"a": torch.ones(2)})
    assert_refused(sharded(tmp_path / "m", **kwargs), capsys, match)


def test_a_duplicate_key_in_the_index_is_refused(tmp_path, capsys):
    folder = sharded(tmp_path / "m")
    (folder / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-1.safetensors", "c": "model-1.safetensors", "b": "model-2.safetensors", '
        '"a": "model-2.safetensors"}}')
    assert_refused(folder, capsys, "duplicate key 'a'")


def test_a_good_index_reads_its_shards(tmp_path):
    folder = sharded(tmp_path / "m")
    tiny_file(folder / "consolidated.safetensors", {"a": torch.ones(2), "b": torch.zeros(3)})  # not in the index
    assert {n: t.tolist() for n, t in read_all(folder).items()} == {"a": [1.0, 1.0], "c": [1.0], "b": [0.0] * 3}


# ------------------------------------------------------------------ config.json, chatvec.json, base_config.json

BAD_JSON = {"a list": ("[1, 2]", "expected a JSON object, found a list"),
            "a string": ('"x"', "expected a JSON object, found a string"),
            "not JSON": ("{model_type: llama}", "Expecting property name"),
            "not UTF-8": (b"{\"x\": \"\xff\"}", "utf-8"),
            "nested deep": ("[" * 100_000 + "]" * 100_000, "nested too deeply")}


@pytest.mark.parametrize("case", list(BAD_JSON))
def test_bad_json_files_are_refused(tmp_path, capsys, case):
    content, match = BAD_JSON[case]

    def put(path: Path) -> None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    model = tmp_path / "model"
    model.mkdir()
    tiny_file(model / "model.safetensors")
    put(model / "config.json")
    assert_refused(model, capsys, f"bad model config .*config.json: .*{match}", read=lambda p: open_weights(p).config)

    vector = ChatVector.from_tensors({"w": torch.ones(2, 2)}).save(tmp_path / "vec")
    put(vector / "base_config.json")
    assert_refused(vector, capsys, f"bad base model config .*base_config.json: .*{match}", read=ChatVector.load,
                   command="compare")
    put(vector / "chatvec.json")
    assert_refused(vector, capsys, f"bad chat vector metadata .*chatvec.json: .*{match}", read=ChatVector.load,
                   command="compare")


# ------------------------------------------------------------------ fuzz

def test_fuzzed_files_are_read_as_the_library_reads_them_or_refused(tmp_path):
    counts, failures = fuzz_headers.run(cases=1000, seed=0, folder=tmp_path)
    assert not failures, "\n".join(failures[:10])
    assert counts["same"] > 50 and counts["refused"] > 150, counts
