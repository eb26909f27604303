"""The core's promises under attack: no clobbering, inputs untouched, no debris, one-line errors.

Each test would fail if its promise broke: outputs are compared byte for byte, inputs by checksum, and the
folder around the output is listed for leftovers.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from chatvec_lab import ChatVector, apply_vectors
from chatvec_lab.cli import main
from chatvec_lab.errors import ChatVecError, NonFiniteError, OutputError, UsageError
from chatvec_lab.io.output import atomic_file, atomic_folder
from conftest import checksums

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def fam(family_factory, tmp_path):
    """A small family plus a saved vector, in a scratch folder of their own."""
    f = family_factory("llama")
    ChatVector.from_models(f["base"], f["chat"]).save(tmp_path / "vec")
    return {**f, "vec": tmp_path / "vec"}


def _apply_args(fam, out, *extra):
    return ["apply", "--target", str(fam["cp"]), "--vector", str(fam["vec"]), "-o", str(out), "-q",
            "--no-lineage-check", *extra]


def _cli(args, capsys):
    rc = main(args)
    return rc, capsys.readouterr().err


def _debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


# ------------------------------------------------------------------ no clobbering, even in a race

def test_output_that_appears_during_the_run_is_not_replaced(fam, tmp_path, monkeypatch, capsys):
    from chatvec_lab.core import apply as apply_module

    out = tmp_path / "out"
    original = apply_module._copy_model_files

    def someone_creates_the_output(*args):
        out.mkdir()
        (out / "mine.txt").write_text("precious")
        return original(*args)

    monkeypatch.setattr(apply_module, "_copy_model_files", someone_creates_the_output)
    rc, err = _cli(_apply_args(fam, out), capsys)
    assert rc == 2 and "appeared while this run was writing" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"] and (out / "mine.txt").read_text() == "precious"
    assert _debris(tmp_path) == []


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "without-renameat2"])
def test_publish_never_replaces(tmp_path, monkeypatch, fallback):
    from chatvec_lab.io import output

    if fallback:
        monkeypatch.setattr(output, "_libc_renameat2", lambda: None)
    for existing in ("folder", "empty file", "dangling link"):
        out = tmp_path / f"out-{existing.replace(' ', '-')}"
        with pytest.raises(OutputError, match="appeared"):
            with atomic_folder(out) as tmp:
                (tmp / "new.txt").write_text("new")
                if existing == "folder":
                    out.mkdir()
                    (out / "old.txt").write_text("old")
                elif existing == "empty file":
                    out.write_text("")
                else:
                    out.symlink_to(tmp_path / "nowhere")
        assert os.path.lexists(out) and not (out.is_dir() and (out / "new.txt").exists())
        csv = tmp_path / f"{existing.replace(' ', '-')}.csv"
        with pytest.raises(OutputError, match="appeared"):
            with atomic_file(csv) as tmp:
                tmp.write_text("new")
                csv.write_text("old")
        assert csv.read_text() == "old"
    assert _debris(tmp_path) == []


def test_two_concurrent_writers_exactly_one_wins(fam, tmp_path):
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import sys, time
        from chatvec_lab.core import apply as a
        from chatvec_lab.cli import main
        original = a._copy_model_files
        def slow(*args):
            time.sleep(1.5)  # both runs are inside the write when the first one publishes
            return original(*args)
        a._copy_model_files = slow
        sys.exit(main({_apply_args(fam, out)!r}))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, cwd=tmp_path)
             for _ in range(2)]
    results = sorted((p.wait(timeout=120), p.stderr.read()) for p in procs)
    assert [rc for rc, _ in results] == [0, 2], results
    assert "already exists" in results[1][1] or "appeared while this run was writing" in results[1][1]
    merged = load_file(next(out.glob("*.safetensors")) if not (out / "model.safetensors.index.json").exists()
                       else sorted(out.glob("*.safetensors"))[0])
    assert merged  # the winner's output is complete and readable
    assert _debris(tmp_path) == []


def test_overwrite_replaces_only_when_complete(fam, tmp_path, monkeypatch, capsys):
    from chatvec_lab.io.shards import ShardedSafetensorsWriter

    out = tmp_path / "out"
    assert _cli(_apply_args(fam, out), capsys)[0] == 0
    before = checksums(out)

    def broken(self, name, tensor):
        raise OSError(28, "No space left on device", str(self.folder / "model.safetensors"))

    monkeypatch.setattr(ShardedSafetensorsWriter, "write", broken)
    rc, err = _cli(_apply_args(fam, out, "--overwrite"), capsys)
    assert rc == 2 and "No space left on device" in err and len(err.strip().splitlines()) == 1
    assert checksums(out) == before  # the old output is intact
    assert _debris(tmp_path) == []


# ------------------------------------------------------------------ inputs are never outputs

@pytest.mark.parametrize("where", ["target", "vector", "base", "chat", "parent of target", "inside target",
                                   "symlink to target"])
def test_output_may_not_be_contain_or_sit_inside_an_input(fam, tmp_path, capsys, where):
    root = fam["root"]
    link = tmp_path / "link"
    link.symlink_to(fam["cp"])
    out = {"target": fam["cp"], "vector": fam["vec"], "base": fam["base"], "chat": fam["chat"],
           "parent of target": root, "inside target": fam["cp"] / "merged", "symlink to target": link}[where]
    before = checksums(root, fam["vec"])
    args = ["apply", "--target", str(fam["cp"]), "--vector", str(fam["vec"]), "--base", str(fam["base"]),
            "-o", str(out), "--overwrite", "-q"]
    rc, err = _cli(args, capsys)
    assert rc == 2 and ("input" in err or "symbolic link" in err), err
    if where in ("base", "chat"):  # an extract whose output is one of its models
        rc, err = _cli(["extract", "--base", str(fam["base"]), "--chat", str(fam["chat"]), "-o", str(out),
                        "--overwrite", "-q"], capsys)
        assert rc == 2 and "input" in err, err
    assert checksums(root, fam["vec"]) == before
    assert not (fam["cp"] / "merged").exists()


def test_saving_a_vector_over_its_own_folder_is_refused(fam):
    vec = ChatVector.load(fam["vec"])
    before = checksums(fam["vec"])
    with pytest.raises(OutputError, match="input"):
        (2 * vec).save(fam["vec"], overwrite=True)
    assert checksums(fam["vec"]) == before


# ------------------------------------------------------------------ signals and killed runs

_SLOW_APPLY = """
import signal, sys, time
for name in ("SIGTERM", "SIGHUP"):  # as from a terminal, whatever started the test run (nohup ignores SIGHUP)
    signal.signal(getattr(signal, name), signal.SIG_DFL)
from chatvec_lab.core import apply as a
from chatvec_lab.cli import main
original = a.merge_tensor
def slow(*args, **kwargs):
    time.sleep(0.5)
    return original(*args, **kwargs)
a.merge_tensor = slow
sys.exit(main(sys.argv[1:]))
"""


def _start_slow_apply(fam, out):
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_APPLY, *_apply_args(fam, out)], stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while not list(out.parent.glob(f".{out.name}.partial-*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.05)
    time.sleep(0.3)
    return proc


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_signals_leave_no_temporary_folder(fam, tmp_path, sig):
    out = tmp_path / "out"
    proc = _start_slow_apply(fam, out)
    proc.send_signal(getattr(signal, sig))
    rc = proc.wait(timeout=60)
    err = proc.stderr.read()
    assert rc == 128 + getattr(signal, sig), err
    assert f"interrupted by {sig}" in err and "Traceback" not in err
    assert not out.exists() and _debris(tmp_path) == []


def test_leftovers_of_a_killed_run_are_removed_by_the_next(fam, tmp_path, capsys):
    out = tmp_path / "out"
    proc = _start_slow_apply(fam, out)
    proc.kill()
    proc.wait(timeout=60)
    left = _debris(tmp_path)
    assert len(left) == 1 and f".partial-{proc.pid}-" in left[0]  # named for its output and its process
    other = tmp_path / ".other.partial-1-abc"  # another output's leftover is not ours to touch
    other.mkdir()
    assert _cli(_apply_args(fam, out), capsys)[0] == 0
    assert _debris(tmp_path) == [other.name]


# ------------------------------------------------------------------ OS errors are one line

_FSIZE = """
import resource, signal, sys
from chatvec_lab.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
sys.exit(main(sys.argv[1:]))
"""


def test_file_too_large_is_one_line_and_leaves_nothing(fam, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", _FSIZE, *_apply_args(fam, out)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "File too large" in done.stderr
    assert not out.exists() and _debris(tmp_path) == []


def test_unwritable_places_and_bad_names(fam, tmp_path, capsys):
    cases = {
        "a name too long": tmp_path / ("x" * 300),
        "a special file system": Path("/proc/chatvec-test-out"),
        "a dangling symlink": tmp_path / "dangling",
        "a file's child": tmp_path / "afile" / "out",
    }
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "afile").write_text("x")
    for what, out in cases.items():
        rc, err = _cli(_apply_args(fam, out), capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1, (what, err)
    assert (tmp_path / "dangling").is_symlink() and (tmp_path / "afile").read_text() == "x"
    assert _debris(tmp_path) == []


def test_broken_pipe_is_quiet(fam):
    done = subprocess.run(f"{sys.executable} -m chatvec_lab.cli info {fam['vec']} | head -1", shell=True,
                          capture_output=True, text=True, timeout=120, executable="/bin/bash")
    assert done.stdout.count("\n") == 1 and "Traceback" not in done.stderr and "Error" not in done.stderr


def test_output_permissions_follow_the_umask(fam, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert _cli(_apply_args(fam, tmp_path / "out"), capsys)[0] == 0
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


# ------------------------------------------------------------------ numbers

def test_float16_overflow_is_checked_in_the_output_dtype(tmp_path):
    target = {"w": torch.full((4, 4), 60000.0, dtype=torch.float16)}
    vec = ChatVector.from_tensors({"w": torch.full((4, 4), 10000.0)})
    with pytest.raises(NonFiniteError, match=r"tensor 'w': the result .* does not fit the target's float16"):
        apply_vectors(target, [(vec, 1.0)], tmp_path / "o", check_lineage=False)
    with pytest.raises(NonFiniteError, match=r"tensor 'w': coefficient 1e\+35 × the vector overflows float32"):
        apply_vectors({"w": torch.ones(4, 4)}, [(vec, 1e35)], tmp_path / "o", check_lineage=False)
    assert not (tmp_path / "o").exists() and _debris(tmp_path) == []


def test_nan_in_an_unchanged_target_tensor_is_refused(tmp_path):
    target = {"w": torch.ones(2, 2), "model.norm.weight": torch.tensor([1.0, float("nan")])}
    vec = ChatVector.from_tensors({"w": torch.ones(2, 2)})
    with pytest.raises(NonFiniteError, match="model.norm.weight.*the target"):
        apply_vectors(target, [(vec, 1.0)], tmp_path / "o", check_lineage=False)


# ------------------------------------------------------------------ smaller items

@pytest.mark.parametrize("extra, message", [
    (["--include", "("], "not a valid regular expression"),
    (["--include", "nomatch"], "leave no tensor"),
    (["--layers", "99"], "layers 99 are not in the target"),
])
def test_filters_that_select_nothing_are_refused(fam, tmp_path, capsys, extra, message):
    rc, err = _cli(_apply_args(fam, tmp_path / "out", *extra), capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_backwards_layer_range_is_refused(fam, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(_apply_args(fam, tmp_path / "out", "--layers", "3-0"))
    assert e.value.code == 2 and "runs backwards" in capsys.readouterr().err


def test_negative_alpha_in_exponent_notation(fam, tmp_path, capsys):
    assert _cli(_apply_args(fam, tmp_path / "out", "--alpha", "-1e-3"), capsys)[0] == 0
    got = load_file(tmp_path / "out" / "model.safetensors") if (tmp_path / "out" / "model.safetensors").exists() \
        else None
    report = (tmp_path / "out" / "chatvec_apply.json").read_text()
    assert '"alpha": -0.001' in report and (got is None or got)


def test_api_type_errors_are_the_projects_errors(fam, tmp_path):
    with pytest.raises(OutputError, match="must be a path"):
        apply_vectors(fam["cp"], fam["vec"], None)
    with pytest.raises(UsageError, match="layers must be"):
        apply_vectors(fam["cp"], fam["vec"], tmp_path / "o", layers=5)
    with pytest.raises(ChatVecError):
        ChatVector.load(None)
    with pytest.raises(ChatVecError):
        apply_vectors(fam["cp"], [(fam["vec"], "one")], tmp_path / "o")


def test_missing_chat_template_fails_before_the_merge(fam, tmp_path, monkeypatch):
    from chatvec_lab.core import apply as apply_module
    from chatvec_lab.errors import SourceError

    def never(*args, **kwargs):
        raise AssertionError("merged before checking the template")

    monkeypatch.setattr(apply_module, "merge_tensor", never)
    with pytest.raises(SourceError, match="no chat template"):
        apply_vectors(fam["cp"], fam["vec"], tmp_path / "o", chat_template_from=fam["base"], check_lineage=False)


def test_token_map_as_one_string_is_one_token(tmp_path):
    from chatvec_lab import toy

    cv = ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False)
    one = apply_vectors(toy.path("cp"), [(cv, 1.0)], tmp_path / "one", token_map="<|end|>", chat=toy.path("chat"))
    listed = apply_vectors(toy.path("cp"), [(cv, 1.0)], tmp_path / "list", token_map=["<|end|>"],
                           chat=toy.path("chat"))
    assert one.tensors.equals(listed.tensors)
    assert checksums(tmp_path / "one")[str(tmp_path / "one" / "model.safetensors")] == \
        checksums(tmp_path / "list")[str(tmp_path / "list" / "model.safetensors")]


def test_legacy_pickle_loads_with_allow_pickle(tmp_path):
    from chatvec_lab import open_weights

    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save(tensors, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    src = open_weights(tmp_path / "legacy.bin", allow_pickle=True)
    assert torch.equal(src.get("w"), tensors["w"])


def test_sweep_csv_is_not_overwritten(fam, tmp_path, capsys):
    csv = tmp_path / "sweep.csv"
    csv.write_text("mine")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hallo\n")
    rc, err = _cli(["sweep", "--target", str(fam["cp"]), "--vector", str(fam["vec"]), "--prompts", str(prompts),
                    "--csv", str(csv), "-q"], capsys)
    assert rc == 2 and "already exists" in err and csv.read_text() == "mine"


def test_info_on_a_vector_with_malformed_metadata_is_one_line(fam, capsys):
    (fam["vec"] / "chatvec.json").write_text("[1, 2]")
    rc, err = _cli(["info", str(fam["vec"]), "-q"], capsys)
    assert rc == 2 and "chat vector metadata" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ found by a hostile review

def test_compare_outputs_are_no_clobber_and_never_inputs(fam, tmp_path, capsys):
    ChatVector.from_models(fam["base"], fam["cp"]).save(tmp_path / "vec2")
    mine = tmp_path / "mine.csv"
    mine.write_text("precious")
    before = checksums(fam["vec"])
    vectors = [str(fam["vec"]), str(tmp_path / "vec2")]
    for extra in (["--csv", str(mine)], ["--csv", str(fam["vec"] / "vector.safetensors"), "--overwrite"],
                  ["--plots", str(fam["vec"]), "--overwrite"], ["--plots", str(fam["vec"] / "plots")]):
        rc, err = _cli(["compare", *vectors, "-q", *extra], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1, (extra, err)
    assert mine.read_text() == "precious" and checksums(fam["vec"]) == before
    assert _cli(["compare", *vectors, "-q", "--csv", str(mine), "--overwrite", "--plots", str(tmp_path / "p")],
                capsys)[0] == 0
    assert mine.read_text().startswith("kind,") and (tmp_path / "p" / "cosine_matrix.png").is_file()


def test_sweep_csv_may_not_be_an_input(fam, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hallo\n")
    before = checksums(fam["cp"], fam["vec"], prompts)
    for csv in (fam["cp"] / "model.safetensors", fam["vec"] / "chatvec.json", prompts):
        rc, err = _cli(["sweep", "--target", str(fam["cp"]), "--vector", str(fam["vec"]), "--prompts", str(prompts),
                        "--csv", str(csv), "--overwrite", "-q"], capsys)
        assert rc == 2 and "input" in err, err
    assert checksums(fam["cp"], fam["vec"], prompts) == before


def test_recorded_base_is_protected_from_another_folder(fam, tmp_path, capsys, monkeypatch):
    root = fam["root"]
    monkeypatch.chdir(root)
    ChatVector.from_models("base", "chat").save(tmp_path / "relvec")  # recorded as relative paths
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    before = checksums(root / "base")
    rc, err = _cli(["apply", "--target", str(root / "cp"), "--vector", str(tmp_path / "relvec"), "-o",
                    str(root / "base"), "--overwrite", "-q"], capsys)
    assert rc == 2 and "input" in err and checksums(root / "base") == before


@pytest.mark.parametrize("option", ["--base", "--chat"])
def test_named_models_are_inputs_even_when_not_read(fam, tmp_path, capsys, option):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(fam["chat"], other)
    before = checksums(other)
    rc, err = _cli(_apply_args(fam, other, option, str(other), "--overwrite"), capsys)
    assert rc == 2 and "input" in err and checksums(other) == before


def test_overwriting_a_file_never_replaces_a_link_that_appears(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("keep")
    csv = tmp_path / "s.csv"
    csv.write_text("old")
    with pytest.raises(OutputError, match="became something other than a file"):
        with atomic_file(csv, overwrite=True) as tmp:
            tmp.write_text("new")
            csv.unlink()
            csv.symlink_to(keep)
    assert csv.is_symlink() and keep.read_text() == "keep" and _debris(tmp_path) == []


def test_usage_errors_are_one_line(fam, tmp_path, capsys):
    for extra in (["--layers", "3-0"], ["--layers", ""], ["--alpha", "nan"], ["--alpha", "inf"],
                  ["--embeddings", "foo"], ["--max-shard-gb", "-1"]):
        with pytest.raises(SystemExit) as e:
            rc = main(_apply_args(fam, tmp_path / "out", *extra))
            raise SystemExit(rc)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, (extra, err)


def test_a_refusal_is_the_only_line(fam, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the vector's recorded base cannot be found by a relative path
    rc, err = _cli(["apply", "--target", str(fam["cp"]), "--vector", str(fam["vec"]), "-o", "x", "--layers", "99",
                    "-q"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1


def test_more_api_arguments_raise_the_projects_errors(fam, tmp_path):
    from chatvec_lab import apply_to_model

    bad_calls = [
        lambda: apply_vectors(fam["cp"], fam["vec"], tmp_path / "o", embeddings="bogus"),
        lambda: apply_to_model(fam["cp"], fam["vec"], embeddings="bogus"),
        lambda: apply_vectors(fam["cp"], [(fam["vec"], {".": "x"})], tmp_path / "o"),
        lambda: apply_vectors(fam["cp"], [(fam["vec"], {"(": 1.0})], tmp_path / "o"),
        lambda: apply_vectors(fam["cp"], fam["vec"], tmp_path / "o", token_map=5, chat=fam["chat"]),
        lambda: apply_vectors(fam["cp"], fam["vec"], tmp_path / "o", max_shard_bytes="1"),
        lambda: ChatVector.load(fam["vec"]).save(tmp_path / "v", max_shard_bytes="x"),
        lambda: apply_vectors(fam["cp"], fam["vec"], str(tmp_path / ("a" * 300) / "x")),
        lambda: ChatVector.load(fam["vec"]).save(str(tmp_path / ("a" * 300) / "x")),
        lambda: apply_vectors(fam["cp"], fam["vec"], str(tmp_path / "cp\0x")),
        lambda: ChatVector.load(fam["vec"]).select(include="("),
        lambda: ChatVector.load(fam["vec"]).select(include=5),
    ]
    for i, call in enumerate(bad_calls):
        with pytest.raises(ChatVecError):
            call()
    assert _debris(tmp_path) == [] and not (tmp_path / "o").exists()


def test_vectors_as_a_mapping_keep_their_coefficients(fam, tmp_path):
    apply_vectors(fam["cp"], {str(fam["vec"]): 0.0}, tmp_path / "o", check_lineage=False)
    from chatvec_lab import open_weights

    out, cp = open_weights(tmp_path / "o"), open_weights(fam["cp"])
    assert sorted(out.keys()) == sorted(cp.keys()) and all(torch.equal(out.get(n), cp.get(n)) for n in cp.keys())


def test_an_input_replaced_while_open_is_read_as_it_was(fam, tmp_path):
    old = ChatVector.load(fam["vec"])
    name = old.names[0]
    before = old[name].clone()
    (3 * ChatVector.from_models(fam["base"], fam["chat"])).save(tmp_path / "new")
    import shutil

    shutil.rmtree(fam["vec"])  # another run replaces the folder under the open vector
    shutil.copytree(tmp_path / "new", fam["vec"])
    assert torch.equal(old[name], before)


def test_empty_rows_of_a_huge_shape_cost_nothing():
    from chatvec_lab.core.vector import row_blocks

    assert list(row_blocks((2**62, 0))) == [slice(0, 2**62)]


def test_output_under_a_dangling_link_is_refused(fam, tmp_path, capsys):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere" / "deeper")
    rc, err = _cli(_apply_args(fam, tmp_path / "link" / "sub"), capsys)
    assert rc == 2 and "dangling" in err and not (tmp_path / "nowhere").exists()


def test_a_leftover_whose_lock_is_held_is_kept(fam, tmp_path, capsys):
    import fcntl

    busy = tmp_path / ".out.partial-1-abcd"  # another writer's, whatever its process id says
    busy.mkdir()
    fd = os.open(busy, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert _cli(_apply_args(fam, tmp_path / "out"), capsys)[0] == 0
        assert busy.is_dir()
    finally:
        os.close(fd)
    assert _cli(_apply_args(fam, tmp_path / "out", "--overwrite"), capsys)[0] == 0
    assert not busy.exists()


def test_index_that_names_nothing_or_forgets_a_shard_is_refused(fam, tmp_path):
    import json
    import shutil

    from chatvec_lab import open_weights
    from chatvec_lab.errors import SourceError

    model = tmp_path / "m"
    shutil.copytree(fam["cp"], model)
    index = model / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    forgotten = sorted(set(data["weight_map"].values()))[-1]
    data["weight_map"] = {k: v for k, v in data["weight_map"].items() if v != forgotten}
    index.write_text(json.dumps(data))
    with pytest.raises(SourceError, match=f"does not list shard {forgotten}"):
        open_weights(model)
    index.write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(SourceError, match="names no tensor"):
        open_weights(model)


# ------------------------------------------------------------------ found by a second hostile review

def test_demo_and_evaluate_may_not_write_over_their_own_data(tmp_path, capsys):
    from chatvec_lab.io import resources
    from chatvec_lab.toy import evaluate

    prompts = resources.data_dir() / "prompts"
    before = checksums(prompts)
    rc, err = _cli(["demo", "-o", str(prompts), "--overwrite", "--quick", "--no-notebooks", "-q"], capsys)
    assert rc == 2 and "input" in err
    assert evaluate.main(["--out", str(resources.data_dir() / "heldout"), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "input" in err and len(err.strip().splitlines()) == 1
    assert evaluate.main(["--out", str(tmp_path), "--seeds", "1"]) == 2  # exists: one line, no traceback
    assert "already exists" in capsys.readouterr().err
    assert checksums(prompts) == before


def test_special_files_at_the_output_are_refused_before_any_work(fam, tmp_path, capsys, monkeypatch):
    from chatvec_lab.analysis import geometry

    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    monkeypatch.setattr(geometry, "vector_stats", lambda *a, **k: (_ for _ in ()).throw(AssertionError("worked")))
    rc, err = _cli(["compare", str(fam["vec"]), "--csv", str(fifo), "--overwrite", "-q"], capsys)
    assert rc == 2 and "not a regular file" in err
    import stat
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_notebooks_into_an_empty_folder_never_replace_what_appears(tmp_path, monkeypatch):
    import shutil as real_shutil

    from chatvec_lab.io import resources

    dest = tmp_path / "nbs"
    dest.mkdir()
    calls = []
    copyfile = real_shutil.copyfile

    def copy_then_someone_writes(src, dst):
        calls.append(dst)
        if len(calls) == 1:
            dest.mkdir(exist_ok=True)
            (dest / "my_work.ipynb").write_text("mine")
        return copyfile(src, dst)

    monkeypatch.setattr(resources.shutil, "copyfile", copy_then_someone_writes)
    with pytest.raises(OutputError, match="appeared"):
        resources.copy_notebooks(dest)
    assert sorted(p.name for p in dest.iterdir()) == ["my_work.ipynb"] and _debris(tmp_path) == []


def test_an_extract_with_nothing_to_extract_leaves_nothing(tmp_path, capsys):
    save_file({"ids": torch.zeros(2, dtype=torch.int32)}, tmp_path / "int.safetensors")
    rc, err = _cli(["extract", "--base", str(tmp_path / "int.safetensors"), "--chat", str(tmp_path / "int.safetensors"),
                    "-o", str(tmp_path / "v"), "-q"], capsys)
    assert rc == 2 and "no floating-point tensor" in err and not (tmp_path / "v").exists()


def test_huge_layer_ranges_are_refused_at_once(fam, tmp_path, capsys):
    start = time.monotonic()
    with pytest.raises(SystemExit):
        main(_apply_args(fam, tmp_path / "o", "--layers", "0-999999999"))
    assert "larger than any model" in capsys.readouterr().err
    with pytest.raises(UsageError, match="no model has"):
        apply_vectors(fam["cp"], fam["vec"], tmp_path / "o", layers=range(0, 10**12))
    assert time.monotonic() - start < 30 and not (tmp_path / "o").exists()


def test_flags_must_be_booleans(fam, tmp_path):
    (tmp_path / "ex").mkdir()
    (tmp_path / "ex" / "f").write_text("keep")
    for call in (lambda: apply_vectors(fam["cp"], fam["vec"], tmp_path / "ex", overwrite="no"),
                 lambda: ChatVector.load(fam["vec"]).save(tmp_path / "ex", overwrite="False"),
                 lambda: apply_vectors(fam["cp"], fam["vec"], tmp_path / "o", progress="no")):
        with pytest.raises(UsageError, match="must be True or False"):
            call()
    assert (tmp_path / "ex" / "f").read_text() == "keep"


_SIGNAL_IN_SWAP = """
import os, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_DFL)
from chatvec_lab.io import output
from chatvec_lab.cli import main
if sys.argv[1] == "fallback":
    output._libc_renameat2 = lambda: None  # no atomic exchange: the old output is moved aside, then replaced
real_same_kind = output._same_kind
def same_kind_with_a_signal(path, folder):  # SIGTERM arrives in the middle of the final swap
    if sys._getframe(1).f_code.co_name == "replace":
        os.kill(os.getpid(), signal.SIGTERM)
    return real_same_kind(path, folder)
output._same_kind = same_kind_with_a_signal
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("how", ["exchange", "fallback"])
def test_a_signal_during_the_final_swap_waits_for_it(fam, tmp_path, capsys, how):
    out = tmp_path / "out"
    assert _cli(_apply_args(fam, out), capsys)[0] == 0
    (out / "old-marker").write_text("old")
    done = subprocess.run([sys.executable, "-c", _SIGNAL_IN_SWAP, how, *_apply_args(fam, out, "--overwrite",
                                                                                     "--alpha", "0.5")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert out.is_dir() and not (out / "old-marker").exists(), (done.stderr, sorted(os.listdir(tmp_path)))
    assert '"alpha": 0.5' in (out / "chatvec_apply.json").read_text()
    assert _debris(tmp_path) == []


def test_an_old_output_left_aside_by_a_killed_replacement_is_put_back(fam, tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli(_apply_args(fam, out), capsys)[0] == 0
    aside = tmp_path / ".out.old-999999-abcd1234"  # what a SIGKILL mid-replacement leaves without renameat2
    out.rename(aside)
    rc, err = _cli(_apply_args(fam, out), capsys)
    assert rc == 2 and out.is_dir() and (out / "chatvec_apply.json").is_file() and not aside.exists()


def test_model_loading_errors_in_apply_to_model_are_one_line(fam, tmp_path):
    import shutil

    from chatvec_lab import apply_to_model, extract

    with pytest.raises(ChatVecError):
        extract({"a": 1}, {"a": 2}, out=tmp_path / "x")
    with pytest.raises(ChatVecError):
        apply_to_model(fam["cp"], fam["vec"], dtype="nope")
    with pytest.raises(ChatVecError):
        apply_to_model(fam["cp"], fam["vec"], foo=1)
    odd = tmp_path / "odd"
    shutil.copytree(fam["cp"], odd)
    (odd / "config.json").unlink()
    os.mkfifo(odd / "config.json")
    with pytest.raises(ChatVecError):
        apply_to_model(odd, fam["vec"])


def test_sweep_cache_may_not_be_an_input(fam, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hallo\n")
    rc, err = _cli(["sweep", "--target", str(fam["cp"]), "--vector", str(fam["vec"]), "--prompts", str(prompts),
                    "--csv", str(tmp_path / "s.csv"), "--cache-dir", str(fam["cp"]), "-q"], capsys)
    assert rc == 2 and "input" in err and not list(fam["cp"].glob("sweep-*"))


def test_folders_made_for_a_failed_output_are_removed(tmp_path):
    target = {"w": torch.full((4, 4), 60000.0, dtype=torch.float16)}
    vec = ChatVector.from_tensors({"w": torch.full((4, 4), 10000.0)})
    with pytest.raises(NonFiniteError):
        apply_vectors(target, [(vec, 1.0)], tmp_path / "newa" / "newb" / "o", check_lineage=False)
    assert not (tmp_path / "newa").exists()


def test_an_empty_token_map_is_refused(fam, tmp_path, capsys):
    rc, err = _cli(_apply_args(fam, tmp_path / "o", "--token-map", ",,,"), capsys)
    assert rc == 2 and "names no token" in err


def test_info_reads_tensors_of_many_dimensions(tmp_path, capsys):
    save_file({"t": torch.ones([1] * 65)}, tmp_path / "deep.safetensors")
    assert _cli(["info", str(tmp_path / "deep.safetensors")], capsys)[0] == 0


def test_api_and_cli_check_lineage_against_the_recorded_base_alike(fam, tmp_path, capsys):
    api = apply_vectors(fam["cp"], ChatVector.load(fam["vec"]), tmp_path / "api")
    assert api.lineage_distance is not None  # the base the saved vector records, found by its absolute path
    rc = main(["apply", "--target", str(fam["cp"]), "--vector", str(fam["vec"]), "-o", str(tmp_path / "cli")])
    out = capsys.readouterr()
    assert rc == 0 and f"{api.lineage_distance:.4f}" in out.out and "not checked" not in out.err


def test_vectors_with_the_same_folder_name_are_both_measured(fam, tmp_path):
    from chatvec_lab.analysis import geometry

    import shutil
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copytree(fam["vec"], tmp_path / "a" / "cv")
    ChatVector.from_models(fam["base"], fam["cp"]).save(tmp_path / "b" / "cv")
    stats = geometry.vector_stats([str(tmp_path / "a" / "cv"), str(tmp_path / "b" / "cv")])
    assert len(stats.names) == 2 and geometry.cosine_matrix(stats).shape == (2, 2)
