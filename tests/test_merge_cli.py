"""``chatvec merge`` as the front page shows it, and its output as one more vector (issue 26).

The README's mergekit config runs unchanged through the README's command (and gives mergekit's output, to the
bit); a merge's output folder is read as merged − base by ``chatvec compare`` and the atlas, and ``--vector-out``
saves that vector; the merging page lists every method of the registry; the merge benchmark runs at its small
size and finds the two tools' outputs equal.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from chatvec_lab import ChatVector, toy
from chatvec_lab.cli import main as cli
from chatvec_lab.core.merge_methods import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out |= load_file(f)
    return out


def _readme_merge() -> tuple[str, list[str]]:
    """The README's merge section: its YAML block, and its command's arguments (after ``chatvec``)."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Merges from a mergekit config", 1)[1].split("\n## ", 1)[0]
    yaml_blocks = re.findall(r"^```yaml\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)
    bash_blocks = re.findall(r"^```bash\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)
    assert len(yaml_blocks) == 1 and len(bash_blocks) == 1, "one YAML and one command in the README's merge section"
    (command,) = [line for line in bash_blocks[0].splitlines() if line.strip()]
    words = shlex.split(command)
    assert words[:2] == ["chatvec", "merge"]
    return yaml_blocks[0], words[1:]


@pytest.fixture
def readme_merge(tmp_path, monkeypatch, capsys):
    """Run the README's command on the README's YAML from the repository's root; the output folder."""
    text, args = _readme_merge()
    config, out = args[1], args[args.index("-o") + 1]
    monkeypatch.chdir(tmp_path)  # the YAML's relative paths: data/toy/… from a copy of the root's data link
    (tmp_path / "data").symlink_to(ROOT / "data")
    Path(config).write_text(text, encoding="utf-8")
    assert cli(args + ["-q"]) == 0
    assert "ties" in capsys.readouterr().out
    return tmp_path, tmp_path / out, text


def test_the_readmes_mergekit_config_runs_unchanged(readme_merge):
    from transformers import AutoModelForCausalLM

    here, out, text = readme_merge
    record = json.loads((out / "chatvec_merge.json").read_text())
    assert record["method"] == "ties" and record["base"] == str((ROOT / "data/toy/base").resolve())
    assert (out / "merge_report.csv").is_file() and (out / "merge_report.png").stat().st_size > 1000  # --report
    merged, base = _weights(out), _weights(ROOT / "data/toy/base")
    assert set(merged) == set(base) and any(not torch.equal(merged[k], base[k]) for k in merged)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) > 10**6


def test_the_readmes_merge_equals_mergekits_to_the_bit(readme_merge):
    pytest.importorskip("mergekit", reason="mergekit is in the bench extra")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    here, out, text = readme_merge
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(here / "mergekit"),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    ours, theirs = _weights(out), _weights(here / "mergekit")
    assert set(ours) == set(theirs)
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """A toy ties merge, its --vector-out vector, and the two chat vectors saved."""
    import yaml

    tmp = tmp_path_factory.mktemp("merged")
    t = toy.path("base").parent
    config = {"merge_method": "ties", "base_model": str(t / "base"), "dtype": "float32",
              "models": [{"model": str(t / m), "parameters": {"weight": w, "density": 0.4}}
                         for m, w in (("chat", 1.0), ("chat-alt", 0.5))]}
    (tmp / "merge.yml").write_text(yaml.safe_dump(config))
    assert cli(["merge", str(tmp / "merge.yml"), "-o", str(tmp / "toy-merged"), "--vector-out",
                str(tmp / "merged-vector"), "-q"]) == 0
    for name, chat in (("cv", "chat"), ("cv-alt", "chat-alt")):
        ChatVector.from_models(t / "base", t / chat).save(tmp / name)
    return tmp


def test_vector_out_is_merged_minus_base(merged):
    vector = ChatVector.load(merged / "merged-vector")
    out, base = _weights(merged / "toy-merged"), _weights(toy.path("base"))
    assert set(vector.names) == set(out)
    for name in vector.names:
        assert torch.equal(vector[name], out[name].float() - base[name].float()), name
    assert vector.metadata["chat"]["path"] == str((merged / "toy-merged").resolve())  # its provenance: the merge
    assert vector.metadata["base"]["path"] == str(toy.path("base").resolve())


def test_compare_takes_a_merge_output_as_one_more_vector(merged, capsys):
    m = merged
    assert cli(["compare", str(m / "cv"), str(m / "cv-alt"), str(m / "toy-merged"), str(m / "merged-vector"),
                "--csv-matrix", str(m / "cos.csv"), "-q"]) == 0
    cos = pd.read_csv(m / "cos.csv", index_col=0)
    assert list(cos.columns) == ["cv", "cv-alt", "toy-merged", "merged-vector"]
    assert cos.loc["toy-merged", "merged-vector"] == pytest.approx(1.0, abs=1e-9)
    for other in ("cv", "cv-alt"):  # the folder read as merged − base is the saved vector
        assert cos.loc["toy-merged", other] == pytest.approx(cos.loc["merged-vector", other], abs=1e-9)
        assert 0.3 < cos.loc["toy-merged", other] < 0.99  # it points along each source, and is neither
    capsys.readouterr()
    assert cli(["compare", str(m / "cv"), str(m / "toy-merged"), str(m / "toy-merged")]) == 2
    assert "once" in capsys.readouterr().err


def test_a_merge_without_a_base_has_no_vector(tmp_path, capsys):
    import yaml

    from chatvec_lab.core.model_merge import merged_vector
    from chatvec_lab.errors import UsageError

    t = toy.path("base").parent
    path = tmp_path / "linear.yml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(t / "chat"), "parameters": {"weight": 1.0}},
        {"model": str(t / "chat-alt"), "parameters": {"weight": 1.0}}]}))
    assert cli(["merge", str(path), "-o", str(tmp_path / "out"), "--vector-out", str(tmp_path / "v"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "base" in err and err.count("\n") == 0 and not (tmp_path / "out").exists()  # before the merge
    assert cli(["merge", str(path), "-o", str(tmp_path / "out"), "-q"]) == 0
    with pytest.raises(UsageError, match="without a base"):
        merged_vector(tmp_path / "out")
    assert merged_vector(tmp_path / "out", base=t / "base").names  # with a base given, it is a vector


def test_the_atlas_takes_a_merge_output_as_its_vector(merged):
    from chatvec_lab.behaviour.atlas import atlas, cells_of

    saved = ChatVector.load(merged / "merged-vector")
    kwargs = dict(alphas=(1.0,), cells=cells_of(saved)[:1], designs=("keep-only",), norm_matched=False,
                  max_new_tokens=4, scorers=("language",), progress=False)
    prompts = ["Erzähl mir etwas über die Liebe."]
    from_folder = atlas(toy.path("cp"), merged / "toy-merged", prompts, **kwargs)
    from_saved = atlas(toy.path("cp"), saved, prompts, **kwargs)
    assert len(from_folder) == 3  # the target, the full vector, one cell
    pd.testing.assert_frame_equal(from_folder, from_saved)


def test_the_merging_page_lists_every_method_of_the_registry():
    page = (ROOT / "docs" / "merging.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", page, flags=re.MULTILINE))
    assert rows == set(REGISTRY), f"docs/merging.md's method table differs from REGISTRY: {rows ^ set(REGISTRY)}"
    assert "merging.md" in (ROOT / "mkdocs.yml").read_text(encoding="utf-8")


def test_the_merge_benchmark_runs_small_and_the_outputs_agree(tmp_path):
    pytest.importorskip("mergekit", reason="the benchmark compares with mergekit (bench extra)")
    pytest.importorskip("psutil")
    record = tmp_path / "record.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_merge.py"), "--size", "small",
                          "--models", str(tmp_path / "models"), "--no-save", "--json", str(record)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(record.read_text())
    assert result["agreement"]["max_abs_diff"] == 0 and result["agreement"]["equal_fraction"] == 1.0
    assert {"chatvec", "mergekit"} == set(result["runs"]) and result["wall_ratio"] > 0
    assert "wall chatvec / mergekit" in run.stdout and "agreement" in run.stdout
    assert not list((tmp_path / "models").glob("bench-merge-*"))  # the outputs are removed


@pytest.mark.parametrize("method, params, shared", [
    ("task_arithmetic", {"weight": 0.7}, {"lambda": 0.8, "normalize": True}),
    ("ties", {"weight": 0.6, "density": 1.0}, {"lambda": 1.3}),
    ("linear", {"weight": 0.5}, {}),
])
def test_elementwise_methods_run_in_row_blocks_with_the_same_bits(tmp_path, monkeypatch, method, params, shared):
    from chatvec_lab.core import model_merge

    t = toy.path("base").parent
    config = {"merge_method": method, "dtype": "float32", "parameters": shared,
              "models": [{"model": str(t / m), "parameters": {**params, "weight": params["weight"] * (i + 1)}}
                         for i, m in enumerate(("chat", "chat-alt", "cp"))]}
    if method != "linear":
        config["base_model"] = str(t / "base")
    calls = []
    kernel = model_merge._kernel
    monkeypatch.setattr(model_merge, "_kernel", lambda *a: calls.append(1) or kernel(*a))
    monkeypatch.setattr(model_merge, "BLOCK_ELEMENTS", 1 << 40)
    model_merge.merge_from_config(config, tmp_path / "whole")
    whole_calls = len(calls)
    monkeypatch.setattr(model_merge, "BLOCK_ELEMENTS", 500)
    model_merge.merge_from_config(config, tmp_path / "blocks")
    assert len(calls) > 3 * whole_calls  # the blocks were used
    whole, blocks = _weights(tmp_path / "whole"), _weights(tmp_path / "blocks")
    assert set(whole) == set(blocks) and all(torch.equal(whole[k], blocks[k]) for k in whole)
    assert any(not torch.equal(whole[k], _weights(t / "chat")[k]) for k in whole)


# ------------------------------------------------------------------ hostile configs, outputs and merge records


@pytest.fixture
def mcase(tmp_path, monkeypatch):
    """Copies of the toy base, chat and chat-alt in ``mcase/`` with a task_arithmetic config beside them (paths
    relative to it); the working folder is ``tmp_path``."""
    import shutil

    import yaml

    t = toy.path("base").parent
    for name in ("base", "chat", "chat-alt"):
        shutil.copytree(t / name, tmp_path / "mcase" / name)
    (tmp_path / "mcase" / "m.yml").write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": "base", "dtype": "float32",
        "models": [{"model": "chat", "parameters": {"weight": 1.0}},
                   {"model": "chat-alt", "parameters": {"weight": 0.5}}]}))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _tree(folder) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*"))}


@pytest.mark.parametrize("args", [
    ["-o", "mo", "--vector-out", "mcase/chat/vec"],
    ["-o", "mo", "--vector-out", "mcase/chat-alt", "--overwrite"],  # would delete the input chat-alt
    ["-o", "mo", "--vector-out", "alt-link", "--overwrite"],  # a link to chat-alt
    ["-o", "mo", "--vector-out", "mcase/nothing/../chat-alt/v"],
    ["-o", "mcase/base/merged"],
    ["-o", "mcase/chat-alt", "--overwrite"],
    ["-o", "mcase", "--overwrite", "--report"],  # holds every input
    ["-o", "mcase/m.yml", "--overwrite"],  # the config file
    ["-o", "tok-link/out", "--tokenizer"],  # inside the tokenizer source (through a link)
])
def test_no_output_is_in_holds_or_is_an_input(mcase, capsys, args):
    import yaml

    (mcase / "alt-link").symlink_to(mcase / "mcase" / "chat-alt")
    (mcase / "tok").mkdir()
    (mcase / "tok" / "tokenizer.json").write_bytes((mcase / "mcase" / "chat" / "tokenizer.json").read_bytes())
    (mcase / "tok-link").symlink_to(mcase / "tok")
    if "--tokenizer" in args:
        args = args[:-1]
        config = yaml.safe_load((mcase / "mcase" / "m.yml").read_text())
        (mcase / "mcase" / "m.yml").write_text(yaml.safe_dump({**config, "tokenizer_source": "../tok-link"}))
    before = _tree(mcase)
    assert cli(["merge", "mcase/m.yml", *args, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "input" in err and err.count("\n") == 0, err
    assert _tree(mcase) == before  # nothing written, nothing deleted


def test_out_and_vector_out_may_not_overlap(mcase, capsys):
    assert cli(["merge", "mcase/m.yml", "-o", "mo", "--vector-out", "mo/v", "-q"]) == 2
    assert "overlap" in capsys.readouterr().err and not Path("mo").exists()


def _merge_yaml(folder: Path, weight: str, extra: str = "") -> Path:
    path = folder / "y.yml"
    path.write_text(f"merge_method: task_arithmetic\nbase_model: base\n{extra}models:\n  - model: chat\n"
                    f"    parameters:\n      weight: {weight}\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("weight, extra, says", [
    ("9" * 400, "", "weight"),  # past float's range: was an OverflowError traceback
    ("9" * 5000, "", "cannot read"),  # past Python's digits for int()
    ("x" * 5000, "", "weight"),  # a long value, quoted short
    ("1.0", "x" * 1000 + ": 1\n", "field"),  # a long unknown field's name
    ("&w 1.0", "", "alias"),  # an anchor
    ("*w", "parameters: &w {normalize: true}\n", "alias"),
    # an alias bomb: 4 levels of 9 aliases; 8 levels took 39 s and 8.4 GB
    (("\n        - &l3 [&l2 [&l1 [&l0 [1,1,1,1,1,1,1,1,1,1], *l0, *l0, *l0, *l0, *l0, *l0, *l0, *l0, *l0], *l1, *l1, "
      "*l1, *l1, *l1, *l1, *l1, *l1, *l1], *l2, *l2, *l2, *l2, *l2, *l2, *l2, *l2, *l2], *l3, *l3, *l3, *l3]\n"
      "        - 1"), "", "alias"),
])
def test_a_hostile_config_is_one_short_line(mcase, capsys, weight, extra, says):
    config = _merge_yaml(mcase / "mcase", weight, extra)
    assert cli(["merge", str(config), "-o", "mo", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and err.count("\n") == 0 and len(err) < 600, err[:600]
    assert not Path("mo").exists()


def test_a_model_listed_twice_is_one_whatever_its_spelling(mcase, capsys):
    import yaml

    from chatvec_lab.core.merge_config import read_config

    (mcase / "chat-link").symlink_to(mcase / "mcase" / "chat")
    path = mcase / "mcase" / "twice.yml"
    for other in ("../mcase/./chat/", str(mcase / "chat-link")):
        path.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": "base", "models": [
            {"model": "chat", "parameters": {"weight": 1, "density": 0.5}},
            {"model": other, "parameters": {"weight": 1, "density": 0.5}}]}))
        assert cli(["merge", str(path), "-o", "mo", "-q"]) == 2
        assert "listed twice" in capsys.readouterr().err and not Path("mo").exists()
    config = read_config({"merge_method": "task_arithmetic", "base_model": "mcase/./base/",
                          "models": ["mcase/chat", "mcase/base"]})
    assert len(config.inputs) == 2 and config.base == 1  # the base, listed, is not added a second time


def test_density_above_one_counts_as_one_and_zero_is_refused_saying_so(mcase, capsys):
    import yaml

    def config(density):
        return yaml.safe_dump({"merge_method": "ties", "base_model": "base", "dtype": "float32", "models": [
            {"model": "chat", "parameters": {"weight": 1.0, "density": density}},
            {"model": "chat-alt", "parameters": {"weight": 0.5, "density": 0.5}}]})

    for name, density in (("d1", 1.0), ("d15", 1.5), ("d0", 0), ("dgrad", [0.5, 0.0])):
        (mcase / "mcase" / f"{name}.yml").write_text(config(density))
    assert cli(["merge", "mcase/d1.yml", "-o", "d1", "-q"]) == 0
    assert cli(["merge", "mcase/d15.yml", "-o", "d15", "-q"]) == 0  # as mergekit: a density ≥ 1 keeps everything
    one, above = _weights("d1"), _weights("d15")
    assert all(torch.equal(one[k], above[k]) for k in one)
    capsys.readouterr()
    for name in ("d0", "dgrad"):  # a gradient reaching 0 at the last layer: refused before the merge too
        assert cli(["merge", f"mcase/{name}.yml", "-o", name, "-q"]) == 2
        err = capsys.readouterr().err
        assert "density must be in (0, 1]; values above 1 count as 1" in err and "chat" in err
        assert not Path(name).exists()


def _rewrite_record(folder: Path, **changes) -> None:
    path = folder / "chatvec_merge.json"
    record = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            record.pop(key, None)
        else:
            record[key] = value
    path.write_text(json.dumps(record))


def test_a_merge_records_its_base_and_its_files_sizes(mcase):
    from chatvec_lab.core.model_merge import merged_vector

    assert cli(["merge", "mcase/m.yml", "-o", "mo", "-q"]) == 0
    record = json.loads(Path("mo/chatvec_merge.json").read_text())
    assert record["base"] == str((mcase / "mcase" / "base").resolve())
    assert record["base_files"] == {"model.safetensors": (mcase / "mcase/base/model.safetensors").stat().st_size}
    full = merged_vector("mo")
    _rewrite_record(Path("mo"), base_files=None)  # a record written before the sizes were kept still works
    old = merged_vector("mo")
    assert set(full.names) == set(old.names) and all(torch.equal(full[n], old[n]) for n in full.names)


@pytest.mark.parametrize("case, says", [
    ("itself", "is the merge folder"),
    ("inside", "inside the merge folder"),
    ("vector", "saved chat vector"),
    ("number", "base field must be a path"),
    ("deleted", "the base recorded in"),
    ("changed", "has changed since the merge"),
    ("one more file", "has changed since the merge"),
    ("swapped", "has changed since the merge"),  # another model of the same shape and size: sizes cannot tell
])
def test_a_merge_record_is_not_trusted_blindly(mcase, capsys, case, says):
    from safetensors.torch import load_file, save_file

    from chatvec_lab.core.model_merge import merged_vector
    from chatvec_lab.errors import ChatVecError

    assert cli(["merge", "mcase/m.yml", "-o", "mo", "--vector-out", "mv", "-q"]) == 0
    base = mcase / "mcase" / "base"
    if case == "itself":
        _rewrite_record(Path("mo"), base=str(mcase / "mo"))
    elif case == "inside":
        (mcase / "mo" / "sub").mkdir()
        _rewrite_record(Path("mo"), base=str(mcase / "mo" / "sub"))
    elif case == "vector":
        _rewrite_record(Path("mo"), base=str(mcase / "mv"))
    elif case == "number":
        _rewrite_record(Path("mo"), base=5)
    elif case == "deleted":
        import shutil

        shutil.rmtree(base)
    elif case == "changed":  # the base replaced by a half-precision copy: the same names, other values
        weights = load_file(base / "model.safetensors")
        save_file({k: v.half() for k, v in weights.items()}, base / "model.safetensors")
    elif case == "swapped":
        import shutil

        shutil.rmtree(base)
        shutil.copytree(toy.path("cp"), base)
    else:
        (base / "pytorch_model.bin").write_bytes(b"0")
    with pytest.raises(ChatVecError, match=says):
        merged_vector("mo")
    capsys.readouterr()
    assert cli(["compare", "mv", "mo"]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and err.count("\n") == 0, err


def test_the_atlas_command_takes_a_merge_output_as_its_vector(merged, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Erzähl mir etwas über die Liebe.\n", encoding="utf-8")
    tables = []
    for vector in (merged / "toy-merged", merged / "merged-vector"):
        out = tmp_path / vector.name
        assert cli(["atlas", "--target", str(toy.path("cp")), "--vector", str(vector), "--prompts", str(prompts),
                    "-o", str(out), "--skip-map", "--ranks", "1", "--max-new-tokens", "2", "-q"]) == 0
        tables.append(pd.read_csv(out / "rank-curve.csv"))
    pd.testing.assert_frame_equal(*tables)  # the folder is read as the vector --vector-out saved


def test_an_output_inside_a_hub_models_cache_is_refused(tmp_path, monkeypatch, capsys):
    """Review round 4 (N1): --vector-out inside a hub model's cache folder replaced the cached model."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    snapshot = cache / "models--fake--chat" / "snapshots" / "abc123"
    shutil.copytree(toy.path("chat"), snapshot)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    shutil.copytree(toy.path("base"), tmp_path / "base")
    config = tmp_path / "hub.yml"
    config.write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: fake/chat\n"
                      "    parameters:\n      weight: 1.0\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    before = {p: p.read_bytes() for p in snapshot.iterdir()}
    for target in (snapshot, snapshot / "vec"):
        assert cli(["merge", str(config), "-o", str(tmp_path / "out"), "--vector-out", str(target), "--overwrite",
                    "-q"]) == 2
        err = capsys.readouterr().err
        assert "models--fake--chat" in err and "input" in err and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in snapshot.iterdir()} == before and not (tmp_path / "out").exists()
