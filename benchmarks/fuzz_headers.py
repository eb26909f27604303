"""Fuzz chatvec's safetensors reader against the safetensors library itself.

Each case is a small valid file, written by ``safetensors.torch.save``, with up to three mutations of its
header object, header bytes or file bytes (offsets, shapes, dtypes, lengths, JSON types and literals,
duplicate keys, nesting, padding, truncation, trailing bytes, byte flips). chatvec must either read exactly
what the library reads (names, dtypes, shapes, bytes) or refuse the file with a one-line SourceError. It may
refuse a file the library reads only for a reason it means to (STRICTER_ON_PURPOSE: a dtype it does not read,
a duplicate key, a tensor entry written as a list, a shape whose dimensions multiply past 2**63 even if one
is 0). Anything else is a failure: another exception, other tensors, accepting a file the library refuses,
a hang.

    python benchmarks/fuzz_headers.py --cases 20000 --seed 0

tests/test_formats.py runs a few hundred cases of the same generator.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from chatvec_lab.errors import SourceError  # noqa: E402
from chatvec_lab.io.sources import open_weights  # noqa: E402

BASE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
               torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16]
DTYPE_NAMES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
               "U16", "U32", "U64", "C64", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F4", "F6_E2M3", "F6_E3M2",
               "f32", "X", "", "F32 ", 4, None, ["F32"]]
SAME_SIZE = [["F32", "I32"], ["F16", "BF16", "I16"], ["U8", "I8", "BOOL", "F8_E4M3", "F8_E5M2"], ["F64", "I64"]]
NUMBERS = [0, 1, 2, 3, 4, 7, 8, 9, 16, -1, -8, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
           1.0, 0.5, True, False, "8", None, [], [8]]
LITERALS = ["-0", "NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e2", "8.0", "08", "1" + "0" * 30,
            "1" + "0" * 400, "true", "null", "-1", "0x10", "+1", "1_0"]
NAMES = ["a", "b.weight", "model.layers.0.mlp.up_proj.weight", "", "ü", "__metadata__x", "x" * 300]
STRICTER_ON_PURPOSE = ("unsupported dtype", "duplicate key", "is a list, not an object", "is too large")


# ------------------------------------------------------------------ a valid file to start from

def valid_file(rng: random.Random) -> tuple[dict, bytes]:
    """``(header, data)`` of a small valid file, as safetensors.torch.save writes it."""
    tensors = {}
    for name in rng.sample(NAMES, rng.randint(0, 4)):
        dtype = rng.choice(BASE_DTYPES)
        shape = [rng.choice([0, 1, 1, 2, 3, 4]) for _ in range(rng.randint(0, 3))]
        numel = 1
        for d in shape:
            numel *= d
        raw = bytearray(rng.randbytes(numel * dtype.itemsize))
        if dtype == torch.bool:
            raw = bytearray(b & 1 for b in raw)
        tensors[name] = torch.frombuffer(raw, dtype=dtype).reshape(shape) if raw else torch.empty(shape, dtype=dtype)
    blob = save(tensors, metadata={"format": "pt"} if rng.random() < 0.5 else None)
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]), blob[8 + n:]


# ------------------------------------------------------------------ mutations of the header object

def _entries(header: dict) -> list[dict]:
    return [v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]


def _some_entry(rng, header):
    entries = _entries(header)
    return rng.choice(entries) if entries else None


def m_offset(rng, header):
    e = _some_entry(rng, header)
    if e and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2:
        i = rng.randrange(2)
        if rng.random() < 0.5 and isinstance(e["data_offsets"][i], int):
            e["data_offsets"][i] += rng.choice([-8, -4, -2, -1, 1, 2, 4, 8])
        else:
            e["data_offsets"][i] = rng.choice(NUMBERS)


def m_offsets_form(rng, header):
    e = _some_entry(rng, header)
    if e:
        begin, end = e["data_offsets"]
        e["data_offsets"] = rng.choice([[end, begin], [begin], [begin, end, end], {"0": begin, "1": end},
                                        None, f"{begin},{end}", [[begin], [end]]])


def m_overlap(rng, header):
    entries = _entries(header)
    if len(entries) >= 2:
        a, b = rng.sample(entries, 2)
        a["data_offsets"] = list(b["data_offsets"])
        a["shape"], a["dtype"] = list(b["shape"]), b["dtype"]


def m_shift_all(rng, header):
    k = rng.choice([1, 2, 4, 8, -1])
    for e in _entries(header):
        e["data_offsets"] = [o + k for o in e["data_offsets"]]


def m_shape(rng, header):
    e = _some_entry(rng, header)
    if e and isinstance(e.get("shape"), list):
        shape, how = e["shape"], rng.randrange(4)
        if how == 0 and shape:
            shape[rng.randrange(len(shape))] = rng.choice(NUMBERS)
        elif how == 1:
            shape.append(rng.choice([0, 1, 2, 2**62, 2**63]))
        elif how == 2 and shape:
            shape.pop()
        else:
            e["shape"] = rng.choice([None, 4, "4", {"0": 4}, [[4]], shape + [1]])


def m_grow_in_place(rng, header):
    """Double a tensor's first dimension and its span: consistent on its own, overlapping its neighbour."""
    e = _some_entry(rng, header)
    if e and e["shape"] and e["data_offsets"][1] > e["data_offsets"][0]:
        e["shape"][0] *= 2
        begin, end = e["data_offsets"]
        e["data_offsets"] = [begin, begin + 2 * (end - begin)]


def m_dtype(rng, header):
    e = _some_entry(rng, header)
    if e:
        if rng.random() < 0.5:
            group = next((g for g in SAME_SIZE if e["dtype"] in g), [e["dtype"]])
            e["dtype"] = rng.choice(group)  # still a valid file, read differently
        else:
            e["dtype"] = rng.choice(DTYPE_NAMES)


def m_entry_type(rng, header):
    names = [k for k in header if k != "__metadata__"]
    if names:
        name = rng.choice(names)
        e = header[name]
        header[name] = rng.choice([[e["dtype"], e["shape"], e["data_offsets"]], None, "x", 1, [], {}])


def m_fields(rng, header):
    e = _some_entry(rng, header)
    if e:
        if rng.random() < 0.4:
            del e[rng.choice(list(e))]
        else:
            depth = rng.choice([1, 2, 50, 124, 125, 126, 127, 300])
            e[rng.choice(["extra", "DTYPE", "offsets"])] = json.loads("[" * depth + "]" * depth)


def m_metadata(rng, header):
    header["__metadata__"] = rng.choice([{"k": "v"}, {}, {"k": 1}, {"k": None}, {"k": ["v"]}, [], None, "x",
                                         {"k": {"a": "b"}}])


def m_rename(rng, header):
    names = [k for k in header if k != "__metadata__"]
    if names:
        header[rng.choice(NAMES + names + ["__metadata__"])] = header.pop(rng.choice(names))


def m_drop_tensor(rng, header):
    names = [k for k in header if k != "__metadata__"]
    if names:
        del header[rng.choice(names)]


def m_zero_size(rng, header):
    ends = [0] + [e["data_offsets"][1] for e in _entries(header)]
    at = rng.choice(ends) + rng.choice([0, 0, 0, 1, -1])
    header[f"zero{rng.randrange(9)}"] = {"dtype": "F32", "shape": [rng.choice([0, 2])], "data_offsets": [at, at]}


def m_top_level(rng, header):
    return rng.choice([[header], "x", 1, None, [], True])


# ------------------------------------------------------------------ mutations of the header bytes

def t_duplicate_key(rng, text: bytes) -> bytes:
    """A tensor entry (or __metadata__) repeated, identically or not: the library keeps the last one."""
    text = text.rstrip()
    member = re.search(rb'"[^"\\]*":\{[^{}]*\}', text)
    dup = rng.choice([member.group(0) if member else b'"a":{}', b'"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}',
                      b'"__metadata__":{"k":"v"}'])
    return text[:-1] + b"," + dup + b"}" if text.endswith(b"}") and len(text) > 2 else text


def t_duplicate_field(rng, text: bytes) -> bytes:
    return text.replace(b'"dtype":', b'"dtype":"F32","dtype":', 1)


def t_literal(rng, text: bytes) -> bytes:
    numbers = list(re.finditer(rb"-?\d+", text))
    if not numbers:
        return text
    m = rng.choice(numbers)
    return text[:m.start()] + rng.choice(LITERALS).encode() + text[m.end():]


def t_pad(rng, text: bytes) -> bytes:
    pad = rng.choice([b" " * rng.randint(1, 9), b"\t\n\r ", b"\0", b"\xa0", "\u00a0".encode(), b"x", b","])
    return pad + text if rng.random() < 0.3 else text + pad


def t_escape(rng, text: bytes) -> bytes:
    strings = list(re.finditer(rb'"[^"\\]*"', text))
    if not strings:
        return text
    m = rng.choice(strings)
    new = rng.choice([rb'"\u0061"', rb'"\ud800"', rb'"\udc00x"', rb'"\ud83d\ude00"', b'"\x01"', b'"\xff"',
                      b'"\xc3\xbc"', rb'"\x"', b'"'])
    return text[:m.start()] + new + text[m.end():]


def t_bom(rng, text: bytes) -> bytes:
    return b"\xef\xbb\xbf" + text


def t_deep(rng, text: bytes) -> bytes:
    """An extra field nested deeper than Python's json module can recurse, or around serde_json's limit."""
    depth = rng.choice([125, 126, 127, 128, 5000, 100_000])
    return text.replace(b'"dtype":', b'"deep":' + b"[" * depth + b"]" * depth + b',"dtype":', 1)


# ------------------------------------------------------------------ mutations of the file bytes

def f_length(rng, blob: bytes) -> bytes:
    n = int.from_bytes(blob[:8], "little")
    new = rng.choice([n + 1, n - 1, n + 8, n - 8, 0, 1, 2, len(blob) - 8, len(blob) - 7, 100_000_001, 2**63,
                      2**64 - 1])
    return max(new, 0).to_bytes(8, "little") + blob[8:]


def f_truncate(rng, blob: bytes) -> bytes:
    return blob[:rng.randrange(len(blob))]


def f_trailing(rng, blob: bytes) -> bytes:
    return blob + rng.randbytes(rng.randint(1, 16))


def f_flip_header(rng, blob: bytes) -> bytes:
    n = min(int.from_bytes(blob[:8], "little"), len(blob) - 8)
    out = bytearray(blob)
    for _ in range(rng.randint(1, 3)):
        if n > 0:
            out[8 + rng.randrange(n)] = rng.choice(b'{}[]":,0123456789-.eE \\') if rng.random() < 0.7 \
                else rng.randrange(256)
    return bytes(out)


def f_flip_anywhere(rng, blob: bytes) -> bytes:
    out = bytearray(blob)
    out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def f_insert_delete(rng, blob: bytes) -> bytes:
    i = rng.randrange(8, len(blob) + 1)
    return blob[:i] + rng.randbytes(1) + blob[i:] if rng.random() < 0.5 else blob[:i] + blob[i + 1:]


HEADER_MUTATIONS = [m_offset, m_offsets_form, m_overlap, m_shift_all, m_shape, m_grow_in_place, m_dtype, m_dtype,
                    m_entry_type, m_fields, m_metadata, m_rename, m_drop_tensor, m_zero_size, m_top_level]
TEXT_MUTATIONS = [t_duplicate_key, t_duplicate_field, t_literal, t_literal, t_pad, t_escape, t_bom, t_deep]
FILE_MUTATIONS = [f_length, f_truncate, f_trailing, f_flip_header, f_flip_header, f_flip_anywhere, f_insert_delete]
MUTATIONS = HEADER_MUTATIONS + TEXT_MUTATIONS + FILE_MUTATIONS


def mutated_file(rng: random.Random) -> tuple[list[str], bytes]:
    """``(mutation names, file bytes)``: a valid file with zero to three mutations, applied header object
    first, then header bytes, then file bytes (the header length is right until a file mutation changes it)."""
    header, data = valid_file(rng)
    chosen = rng.sample(MUTATIONS, rng.choice([0, 1, 1, 2, 2, 3]))
    for m in (m for m in HEADER_MUTATIONS if m in chosen):
        header = _apply(m, rng, header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    for m in (m for m in TEXT_MUTATIONS if m in chosen):
        text = _apply(m, rng, text)
    blob = len(text).to_bytes(8, "little") + text + data
    for m in (m for m in FILE_MUTATIONS if m in chosen):
        blob = _apply(m, rng, blob)
    return [m.__name__ for m in chosen], blob


def _apply(mutation, rng, value):
    """The mutated value; unchanged where the mutation no longer applies (an earlier one took away
    what it changes: a field, a tensor, the bytes of a truncated file)."""
    try:
        changed = mutation(rng, value)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return value
    return value if changed is None else changed


# ------------------------------------------------------------------ judging one case

def _contents(tensor: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    return str(tensor.dtype), tuple(tensor.shape), tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def library_reads(path: Path) -> dict | None:
    """What the safetensors library reads from ``path``, or None if it refuses it (or torch cannot hold it)."""
    try:
        with safe_open(path, "pt") as f:
            return {name: _contents(f.get_tensor(name)) for name in f.keys()}
    except Exception:
        return None
    except BaseException as e:  # a Rust panic surfaces as pyo3's PanicException, a BaseException
        if type(e).__name__ == "PanicException":
            return None
        raise


def chatvec_reads(path: Path) -> dict:
    source = open_weights(path)
    return {name: _contents(source.get(name)) for name in source.keys()}


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the main thread if the block runs longer than ``seconds`` (a hang guard)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def judge(path: Path, seconds: float = 5.0) -> tuple[str, str]:
    """``(verdict, detail)``; verdict "same" (read as the library reads it), "refused" (one-line SourceError,
    the library refuses it too), "stricter" (one-line SourceError for a reason in STRICTER_ON_PURPOSE, the
    library reads it) or "FAIL"."""
    try:
        with time_limit(seconds):
            expected = library_reads(path)
            try:
                got = chatvec_reads(path)
            except SourceError as e:
                message = str(e)
                if "\n" in message:
                    return "FAIL", f"a message of several lines: {message!r}"
                if expected is None:
                    return "refused", message
                if any(reason in message for reason in STRICTER_ON_PURPOSE):
                    return "stricter", message
                return "FAIL", f"refused a file the library reads: {message}"
    except Exception as e:
        return "FAIL", f"{type(e).__name__}: {e}"
    if expected is None:
        return "FAIL", f"read a file the library refuses: {sorted(got)}"
    if got != expected:
        return "FAIL", "read other tensors than the library"
    return "same", ""


def run(cases: int, seed: int, folder: Path) -> tuple[Counter, list[str]]:
    """Counts of verdicts over ``cases`` mutated files, and a description of each failure."""
    rng = random.Random(seed)
    counts: Counter = Counter()
    failures = []
    for i in range(cases):
        mutations, blob = mutated_file(rng)
        path = folder / f"case{i}.safetensors"
        path.write_bytes(blob)
        verdict, detail = judge(path)
        counts[verdict] += 1
        if verdict == "FAIL":
            failures.append(f"case {i} ({'+'.join(mutations) or 'valid'}): {detail}")
        path.unlink()
    return counts, failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        counts, failures = run(args.cases, args.seed, Path(tmp))
    wall = time.perf_counter() - start
    print(f"{args.cases} cases, seed {args.seed}, {wall:.1f} s ({1e3 * wall / max(args.cases, 1):.2f} ms a case)")
    print(f"  read exactly as the safetensors library reads them: {counts['same']}")
    print(f"  refused with one line, the library refuses them too: {counts['refused']}")
    print(f"  refused with one line, the library reads them (on purpose: {', '.join(STRICTER_ON_PURPOSE)}): "
          f"{counts['stricter']}")
    print(f"  anything else: {counts['FAIL']}")
    for line in failures[:20]:
        print("   ", line)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
