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
