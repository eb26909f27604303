"""A sweep's grid on Ray: the same table as a local run, every cell once when an actor dies, and a resumable
per-cell cache. Ray runs on this machine (``ray.init(num_cpus=2)``), started by the tests themselves."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

import chatvec_lab.behaviour.engines as engines
from chatvec_lab import toy
from chatvec_lab.errors import ChatVecWarning, Unavailable, UsageError
from chatvec_lab.behaviour.grid import RayExecutor
from chatvec_lab.behaviour.sweep import sweep
from chatvec_lab.core.vector import ChatVector

PROMPTS = ["Erzähl mir was über Geld.", "Was weißt du über Liebe?", "Sag etwas über Arbeit."]
GRID = dict(alphas=[0.0, 0.5, 1.0], prompts=PROMPTS, seeds=2, max_new_tokens=8, scorers=["language"],
            progress=False)


@pytest.fixture(scope="module")
def ray_local():
    import ray  # in the test extra (pyproject.toml): CI's fresh venv has it

    # one logical GPU: Ray places GPU actors on it (CUDA_VISIBLE_DEVICES set), torch finds no CUDA and runs on the CPU
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def vectors():
    return {"chat": ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False)}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the actors run one torch thread each: the same kernels, the same numbers
    yield
    torch.set_num_threads(before)


def _local(vectors, **kw):
    return sweep(toy.path("cp"), vectors, **{**GRID, **kw})


def test_two_actors_give_the_local_table(ray_local, vectors, one_thread):
    local = _local(vectors)
    remote = sweep(toy.path("cp"), vectors, executor=RayExecutor(actors=2, threads_per_actor=1), **GRID)
    pd.testing.assert_frame_equal(local, remote)
    assert len(remote) == 3 * 2 * len(PROMPTS)


def test_actors_sharing_a_gpu_give_the_local_table(ray_local, vectors, one_thread):
    """Issue 25 (4): --gpus-per-actor 0.5 puts two actors on one GPU, each loading its model once; the table is
    the local one (here the GPU is a logical one, so the numbers are the CPU's: the plumbing is what is tested)."""
    local = _local(vectors)
    executor = RayExecutor(actors=2, threads_per_actor=1, gpus_per_actor=0.5)
    remote = sweep(toy.path("cp"), vectors, executor=executor, **GRID)
    pd.testing.assert_frame_equal(local, remote)
    assert [a.get("GPU") for a in executor.assigned] == [0.5, 0.5]
    with pytest.warns(ChatVecWarning, match="running 1"):  # 2 × 1 GPU on a one-GPU cluster: one actor, no hang
        one = sweep(toy.path("cp"), vectors, executor=RayExecutor(actors=2, gpus_per_actor=1), **GRID)
    pd.testing.assert_frame_equal(local, one)
    with pytest.raises(Unavailable, match="asks for 2 GPUs but the Ray cluster has 1"):
        sweep(toy.path("cp"), vectors, executor=RayExecutor(actors=1, gpus_per_actor=2), **GRID)
    with pytest.raises(UsageError, match="leave --device at auto"):
        sweep(toy.path("cp"), vectors, executor=RayExecutor(gpus_per_actor=0.5), device="cpu", **GRID)
    for bad in (-1, 1.5, float("nan"), "1", True):
        with pytest.raises(UsageError, match="gpus per actor"):
            RayExecutor(gpus_per_actor=bad)


def test_gpus_per_actor_flag_is_checked(capsys):
    from chatvec_lab.cli import main
    for bad in ("1.5", "-0.5", "x"):
        with pytest.raises(SystemExit):
            main(["sweep", "--target", "t", "--vector", "v", "--prompts", "p", "--csv", "c", "--ray",
                  "--gpus-per-actor", bad])
        assert "--gpus-per-actor is 0, a fraction up to 1" in capsys.readouterr().err
    assert main(["sweep", "--target", "t", "--vector", "v", "--prompts", "p", "--csv", "c",
                 "--gpus-per-actor", "0.5"]) == 2
    assert "go with --ray" in capsys.readouterr().err


def test_a_killed_actor_loses_no_cell(ray_local, vectors, one_thread):
    killed = []

    def kill_the_other(cell, rows, actor):
        if not killed:  # after the first finished cell, kill the other actor mid-grid
            other = 1 - actor
            ray_local.kill(executor.actors[other])
            killed.append(other)

    executor = RayExecutor(actors=2, threads_per_actor=1, on_result=kill_the_other)
    remote = sweep(toy.path("cp"), vectors, executor=executor, **GRID)
    assert killed and executor.replaced >= 1
    pd.testing.assert_frame_equal(_local(vectors), remote)  # every cell exactly once, in order
    assert remote.groupby(["alpha", "seed"]).size().eq(len(PROMPTS)).all()


def test_ray_needs_paths_not_objects(ray_local, vectors):
    model, tokenizer = toy.load("cp")
    with pytest.raises(UsageError, match="folder or hub id"):
        sweep(model, vectors, tokenizer=tokenizer, executor=RayExecutor(actors=1), **GRID)
    computed = {"half": vectors["chat"] * 0.5}
    with pytest.raises(UsageError, match="saved vector folders"):
        sweep(toy.path("cp"), computed, executor=RayExecutor(actors=1), **GRID)
    with pytest.raises(UsageError, match="actors"):
        RayExecutor(actors=0)


def test_an_interrupted_grid_resumes_with_the_missing_cells(tmp_path, vectors, monkeypatch):
    real = engines.generate
    calls = []

    def failing_after_two(*a, **k):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt  # the whole grid stops: a Ctrl-C, a lost driver
        return real(*a, **k)

    monkeypatch.setattr(engines, "generate", failing_after_two)
    with pytest.raises(KeyboardInterrupt):
        _local(vectors, cache_dir=tmp_path)
    assert len(list((tmp_path / "cells").glob("cell-*.json"))) == 2  # the two finished cells were kept

    calls.clear()
    monkeypatch.setattr(engines, "generate", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = _local(vectors, cache_dir=tmp_path)
    assert len(calls) == 6 - 2  # only the missing cells ran
    monkeypatch.setattr(engines, "generate", real)
    pd.testing.assert_frame_equal(resumed, _local(vectors), check_dtype=False)


def test_cli_sweep_on_ray_writes_the_local_csv(ray_local, tmp_path, one_thread):
    from chatvec_lab.cli import main as cli
    cv = tmp_path / "cv"
    ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False).save(cv)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    common = ["sweep", "--target", str(toy.path("cp")), "--vector", str(cv), "--alphas", "0,1", "--prompts",
              str(prompts), "--scorers", "ended_turn,language", "--max-new-tokens", "6", "-q"]
    assert cli(common + ["--csv", str(tmp_path / "local.csv")]) == 0
    assert cli(common + ["--csv", str(tmp_path / "ray.csv"), "--ray", "--actors", "2"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "local.csv"), pd.read_csv(tmp_path / "ray.csv"))
    assert cli(common + ["--csv", str(tmp_path / "x.csv"), "--actors", "3"]) == 2  # --actors without --ray


def test_atlas_on_two_actors_gives_the_local_atlas(ray_local, vectors, one_thread):
    from chatvec_lab.behaviour.atlas import atlas, cells_of
    cv = vectors["chat"]
    cells = [c for c in cells_of(cv) if c.row in ("lm_head", "norms")]
    kw = dict(alphas=[1.0], cells=cells, max_new_tokens=6, progress=False)
    local = atlas(toy.path("cp"), cv, PROMPTS, **kw)
    remote = atlas(toy.path("cp"), cv, PROMPTS, executor=RayExecutor(actors=2, threads_per_actor=1), **kw)
    pd.testing.assert_frame_equal(local.drop(columns="rewritten_tensors"), remote.drop(columns="rewritten_tensors"))
    assert set(local["cell"]) == {"target", "full", "lm_head", "norms"}


def test_a_damaged_cache_cell_is_run_again_and_the_cache_reads_back_exactly(tmp_path, vectors):
    fresh = _local(vectors, cache_dir=tmp_path)
    cells = sorted((tmp_path / "cells").glob("cell-*.json"))
    cells[0].write_text("")  # emptied
    cells[1].write_text('{"columns": ["prompt"], "dtypes": {}, "rows": [["x"]]}')  # another table
    cells[2].write_text(cells[2].read_text()[:50])  # cut
    for f in (tmp_path).glob("sweep-*.json"):
        f.unlink()  # the whole-grid copy too: only the cells answer now
    again = _local(vectors, cache_dir=tmp_path)
    pd.testing.assert_frame_equal(fresh, again)  # exact: dtypes and every float bit
    assert _local(vectors, cache_dir=tmp_path).equals(fresh)  # and from the whole-grid copy


def test_table_files_keep_strings_and_floats(tmp_path):
    from chatvec_lab.behaviour.cache import read_table, write_table
    df = pd.DataFrame({"reply": ["007", "1e5", ""], "x": [128.330261023326, float("nan"), 1 / 3], "ok": [True, False, True]})
    write_table(tmp_path / "t.json", df)
    pd.testing.assert_frame_equal(read_table(tmp_path / "t.json"), df)
    assert read_table(tmp_path / "missing.json") is None


def test_cache_dir_is_checked_before_any_work(tmp_path, vectors):
    from chatvec_lab.errors import OutputError
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        _local(vectors, cache_dir=tmp_path / "afile")
    with pytest.raises(OutputError):
        _local(vectors, cache_dir=toy.path("cp") / "cache")
    assert not (toy.path("cp") / "cache").exists()


def test_a_changed_chat_template_invalidates_the_cache(tmp_path, vectors):
    import shutil
    cp = tmp_path / "cp"
    shutil.copytree(toy.path("cp"), cp)
    grid = dict(GRID, alphas=[1.0], seeds=1)
    first = sweep(cp, vectors, cache_dir=tmp_path / "c", **grid)
    template = cp / "chat_template.jinja"
    template.write_text("Hallo! " + template.read_text())  # weights unchanged, the prompts' tokens not
    again = sweep(cp, vectors, cache_dir=tmp_path / "c", **grid)
    assert again["prompt_tokens"].tolist() != first["prompt_tokens"].tolist()


def test_ray_executor_settings_are_checked():
    with pytest.raises(UsageError, match="threads_per_actor"):
        RayExecutor(threads_per_actor=0)
    with pytest.raises(UsageError, match="threads_per_actor"):
        RayExecutor(threads_per_actor=-1)


def test_an_actor_asking_for_more_cpus_than_the_cluster_has_is_refused(ray_local, vectors):
    from chatvec_lab.errors import Unavailable
    with pytest.raises(Unavailable, match="lower --threads-per-actor"):
        sweep(toy.path("cp"), vectors, executor=RayExecutor(actors=1, threads_per_actor=64), **GRID)
