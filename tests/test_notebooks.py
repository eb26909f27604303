"""Every notebook runs top to bottom offline on the toy family; key outputs are checked; none is committed with outputs."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
COURSE = [p for p in NOTEBOOKS if p.stem[:2] in {"01", "02", "03", "04", "05", "06", "07"}]  # sessions one and two
PRINTS_CHECK = re.compile(r"""print\(\s*["']CHECK""")
HIDDEN = {"source_hidden": True, "outputs_hidden": True}


def _stream_text(cell) -> str:
    return "".join(out.get("text", "") for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def run_notebook(path: Path, tmp_path: Path) -> tuple[dict, nbformat.NotebookNode]:
    """Execute the notebook in ``tmp_path``; returns its CHECK lines merged, and the executed notebook."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    checks = {}
    for cell in nb.cells:
        for line in _stream_text(cell).splitlines():
            if line.startswith("CHECK "):
                checks.update(json.loads(line[6:]))
    return checks, nb


def test_notebooks_exist_and_have_a_configure_cell():
    assert len(NOTEBOOKS) == 8 and NOTEBOOKS[0].name == "00_course.ipynb" and len(COURSE) == 7
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert 'toy.path("base")' in code[0].source, f"{path.name}: first code cell must configure the models"
        assert sum(c.cell_type == "markdown" for c in nb.cells) >= 3, f"{path.name} needs prose"


def _committed(path):
    """The notebook as git holds it (HEAD), so a student's saved run in the checkout does not fail the suite;
    the file itself outside a git checkout."""
    root = path.resolve().parents[1]
    done = subprocess.run(["git", "-C", str(root), "show", f"HEAD:notebooks/{path.name}"], capture_output=True,
                          text=True)
    if done.returncode == 0:
        return nbformat.reads(done.stdout, as_version=4)
    return nbformat.read(path, as_version=4)


def test_committed_notebooks_have_no_outputs():
    for path in NOTEBOOKS:
        nb = _committed(path)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name} has outputs"


def test_check_cells_are_tagged_and_hidden():
    """Every cell that prints a CHECK line is tagged "check" and folded in JupyterLab (source and outputs)."""
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        checks = [c for c in nb.cells if c.cell_type == "code" and PRINTS_CHECK.search(c.source)]
        assert checks, f"{path.name} has no cell printing CHECK"
        for cell in nb.cells:
            prints = cell.cell_type == "code" and bool(PRINTS_CHECK.search(cell.source))
            tagged = "check" in cell.metadata.get("tags", [])
            assert prints == tagged, f"{path.name}: cell {cell.get('id')} prints CHECK: {prints}, tagged: {tagged}"
            if prints:
                hidden = cell.metadata.get("jupyter", {})
                assert all(hidden.get(k) is True for k in HIDDEN), f"{path.name}: CHECK cell {cell.get('id')} not hidden"


def test_course_structure():
    """Notebook 0 explains the collapsed cells; notebooks 1-7 open with learning objectives and end with exercises
    whose checks name exercises of that notebook; every exercise appears in its notebook."""
    from chatvec_lab.course import exercises as ex

    course = nbformat.read(NOTEBOOKS[0], as_version=4)
    prose = "\n".join(c.source for c in course.cells if c.cell_type == "markdown")
    assert "collapsed" in prose and "`check`" in prose and "nbstripout" in prose
    assert "arxiv.org/abs/2310.04799" in prose and "aclanthology.org/2024.acl-long.590" in prose
    used = set()
    for path in COURSE:
        nb = nbformat.read(path, as_version=4)
        assert nb.cells[0].source.startswith("# ") and nb.cells[1].cell_type == "markdown"
        assert "Learning objectives" in nb.cells[1].source, f"{path.name}: no learning objectives after the title"
        starts = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.startswith("## Exercises")]
        assert len(starts) == 1, f"{path.name}: needs one '## Exercises' section"
        after = nb.cells[starts[0]:]
        assert not any(c.cell_type == "code" and PRINTS_CHECK.search(c.source) for c in after), path.name
        names = [m for c in after if c.cell_type == "code" for m in re.findall(r'ex\.check\("([a-z_]+)"', c.source)]
        assert len(names) >= 2, f"{path.name}: needs at least 2 ex.check( calls in its Exercises section"
        for name in names:
            assert ex.EXERCISES[name].notebook == path.stem, f"{path.name} checks {name}, an exercise of another notebook"
        assert not any("ex.solution(" in c.source for c in nb.cells if c.cell_type == "code"), path.name
        used |= set(names)
    assert used == set(ex.EXERCISES), f"exercises in no notebook: {sorted(set(ex.EXERCISES) - used)}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_offline(path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    checks, executed = run_notebook(path, tmp_path)
    assert checks, f"{path.name} printed no CHECK line"
    for cell in executed.cells:
        text = _stream_text(cell)
        if any(line.startswith("CHECK ") for line in text.splitlines()):
            assert "check" in cell.metadata.get("tags", []), f"{path.name}: a cell printed CHECK but is not tagged"
        if cell.cell_type == "code" and "ex.check(" in cell.source:  # blank exercises: no error, no verdict
            assert "not answered yet" in text and "✗" not in text and "✓" not in text, (path.name, text)
    name = path.stem
    if name.startswith("00"):
        assert checks["notebooks"] == 7 and checks["missing"] == [] and checks["models"]  # sessions one and two
        assert checks["exercises"] >= 12 and all(2 <= len(v) <= 3 for v in checks["exercises_per_notebook"].values())
    elif name.startswith("01"):
        assert checks["files"] and checks["lineage"] < 0.5
        assert checks["cpcv_ended"] > checks["cp_ended"]
    elif name.startswith("02"):
        assert checks["layers"] >= 4 and checks["min_effective_rank"] >= 1
        assert {"attn_q", "mlp_up", "embed", "lm_head"} <= set(checks["modules"])
    elif name.startswith("03"):
        assert checks["cos_chat_alt"] > checks["cos_chat_language"]
        fam = checks["families"]
        assert fam["toy · CP + 1·CV"]["refusal"] < fam["toy · chat"]["refusal"]
        assert fam["toy-bilingual · chat"]["share_de"] > fam["toy · chat"]["share_de"]
    elif name.startswith("04"):
        assert checks["rows"] == 7 * 16 * 2
        assert checks["ended_1"] > checks["ended_0"]
    elif name.startswith("05"):
        assert checks["refusal_1"] >= checks["refusal_0"] and checks["turns"] == 6
    elif name.startswith("06"):
        assert checks["full"] > checks["none"] == 0 and checks["keep_only_max"] == 0 and checks["knock_out_lm_head"] == 0
        assert checks["rank"]["rank 1"] < checks["rank"]["rank 64"]
        assert {"chat", "chat-alt", "linear", "ties", "dare_ties", "breadcrumbs_ties"} == set(checks["merges_at_1"])
    elif name.startswith("07"):
        ended = checks["negation_ended"]
        assert checks["same_weights"] < 1e-6 and ended["chat -1"] == ended["chat-alt -1"] == 0 < ended["chat 0"]
        assert checks["no_barrier_shared_base"] and checks["permuted_barrier_en"] > 1 and checks["same_function"] < 1e-4
        assert checks["average_ended"] < checks["cp_cv_ended"] and checks["soup_vs_best_en"] < 0
        merges = checks["merges_ended"]
        assert merges["TIES"] < merges["task arithmetic"] and merges["DARE-TIES"] < merges["task arithmetic"]
        assert checks["alpha_along_chat"]["TIES"] < 0.75 < checks["alpha_along_chat"]["task arithmetic"]
        assert checks["slerp_linear_tensors"] >= 1 and checks["sphere_minus_line_max"] < 0.01
        assert checks["lerp_vectors_median"] < 0.8 <= checks["slerp_vectors_min"]
