"""Shared pytest setup: the repository root on sys.path (scripts are imported by module name)
and the read-only reference data that sits beside the repository."""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data next to the repository (raw ReDial and INSPIRED copies); skip when absent."""
    path = REPO.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"reference data not found at {path}")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module with one torch thread: small ops are several times slower with 2 on small CPUs.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def inspired_prepared(tmp_path_factory, shared_data) -> Path:
    """INSPIRED prepared once per session by 01_prep_data.py; read-only for the tests (link it)."""
    import importlib

    prep = importlib.import_module("01_prep_data")
    run_dir = tmp_path_factory.mktemp("inspired_prepared")
    prep.main(["--dataset", "inspired", "--raw-dir", str(shared_data / "inspired"), "--run-dir", str(run_dir)])
    return run_dir


def link_run(base: Path, dest: Path, parts=("data",)) -> Path:
    """A fresh run directory `dest` whose `parts` (data/, retriever/, ...) are symlinks into `base`,
    so each test writes its own stage outputs over shared, read-only inputs."""
    dest.mkdir(parents=True)
    for part in parts:
        (dest / part).symlink_to(base / part)
    return dest


@pytest.fixture(scope="session")
def make_run():
    """link_run as a fixture (test modules are not importable from each other)."""
    return link_run


TINY_LLM = ["--model", "tiny", "--threads", "1"]


@pytest.fixture(scope="session")
def inspired_with_retriever(tmp_path_factory, inspired_prepared):
    """Prepared INSPIRED data and a small fused retriever (read-only: link it with make_run)."""
    import importlib

    rec = importlib.import_module("03_sft_recommender")
    run_dir = link_run(inspired_prepared, tmp_path_factory.mktemp("inspired_rec") / "run")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    rec.main(["--dataset", "inspired", "--run-dir", str(run_dir), "--parts", "retriever", "--max-samples", "40",
              "--epochs", "1", "--dim", "32", "--variants", "fused"])
    torch.set_num_threads(n)
    return run_dir


@pytest.fixture(scope="session")
def inspired_tiny_adapters(tmp_path_factory, inspired_with_retriever):
    """The retriever run plus tiny-model adapters: simulator/, simulator_feedback_only/ and
    recommender_sft/ (one SFT step each), what 04 and 05's multi-turn rows read. Read-only."""
    import importlib

    sim, rec = importlib.import_module("02_sft_simulator"), importlib.import_module("03_sft_recommender")
    run_dir = link_run(inspired_with_retriever, tmp_path_factory.mktemp("inspired_tiny") / "run", ("data", "retriever"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    sim_args = ["--run-dir", str(run_dir), "--steps", "1", "--max-train-samples", "10", "--max-eval-samples", "1",
                "--max-len", "160", "--batch-size", "2"] + TINY_LLM
    sim.main(sim_args)
    sim.main(sim_args + ["--task-mix", "1", "0", "0", "--out", "simulator_feedback_only"])
    rec.main(["--dataset", "inspired", "--run-dir", str(run_dir), "--parts", "recommender", "--max-samples", "40",
              "--batch-size", "2", "--max-len", "1280", "--max-eval-samples", "1", "--max-new-tokens", "4",
              "--gen-batch-size", "4", "--steps", "1"] + TINY_LLM)
    torch.set_num_threads(n)
    return run_dir
