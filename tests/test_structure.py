"""The layout a reader relies on: layers, one name one thing, --help in groups, file sizes, and the
registries through which a one-file change reaches the command line."""

import ast
import sys
from pathlib import Path

import pytest
import torch
from conftest import prime_argv

import episodes
import maml
import meta_pretrain
from plumbing.pretrained import evaluation_mode

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = {"adapters", "episodes", "maml", "implicit", "implicit_priming", "peft_config", "peft_checkpoint",
              "hf_peft"}
STAGES = {"meta_pretrain", "finetune_peft", "evaluate_ner"}
CLI_ENTRY_POINTS = {"main", "build_parser", "check_args"}  # each command line's own
MAX_LINES = 380


def project_files():
    """The .py files outside tests/ and the benchmarks (and the course's tests)."""
    skip = ("tests", "benchmarks")
    return [p for p in ROOT.rglob("*.py") if not any(part in skip for part in p.relative_to(ROOT).parts)
            and ".git" not in p.parts]


def imported_modules(path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_plumbing_imports_neither_components_nor_stages():
    for path in (ROOT / "plumbing").glob("*.py"):
        wrong = imported_modules(path) & (COMPONENTS | STAGES)
        assert not wrong, f"{path.name} imports {wrong}: plumbing must not depend on the method"


def test_components_import_no_stage():
    for name in COMPONENTS:
        assert not imported_modules(ROOT / f"{name}.py") & STAGES, name


def test_no_function_name_is_defined_in_two_files():
    where = {}
    for path in project_files():
        for node in ast.walk(ast.parse(path.read_text())):   # methods and nested functions too
            named = isinstance(node, ast.FunctionDef) and not node.name.startswith("__")
            if named and node.name not in CLI_ENTRY_POINTS:
                where.setdefault(node.name, set()).add(str(path.relative_to(ROOT)))
    assert {name: files for name, files in where.items() if len(files) > 1} == {}


def test_every_project_file_stays_short():
    long = {str(p.relative_to(ROOT)): n for p in project_files() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_meta_pretrain_help_is_grouped_and_shows_real_defaults(capsys):
    with pytest.raises(SystemExit):
        meta_pretrain.main(["--help"])
    text = capsys.readouterr().out
    groups = [line for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert len(groups) >= 5 and groups[0] == "options:"                # the general one and at least four more
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "seed of every RNG (data order, fresh PEFT draws,\n                        dropout) (default: 0)" in text
    flags = [a.option_strings[0] for a in meta_pretrain.build_parser()._actions]
    assert len(flags) == len(set(flags))


def test_a_new_inner_optimizer_reaches_the_command_line(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """maml.INNER_OPTIMIZERS is what --inner-optimizer offers: a one-file extension is a whole feature."""
    calls = []

    def halved_sgd(tensor, grad, lr, state):
        state["steps"] = state.get("steps", 0) + 1
        calls.append(state["steps"])
        return tensor - 0.5 * lr * grad
    monkeypatch.setitem(maml.INNER_OPTIMIZERS, "halved", halved_sgd)
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, tmp_path / "p", "--steps", "1", "--inner-steps", "2",
                                  "--eval-every", "0", "--inner-optimizer", "halved"))
    assert calls and set(calls) == {1, 2}            # the rule ran, with a state of its own per tensor and loop
    with pytest.raises(SystemExit):                  # and an unknown one is refused by the parser
        meta_pretrain.build_parser().parse_args(["--inner-optimizer", "nesterov"])


def test_a_new_inner_params_choice_reaches_the_command_line(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """episodes.INNER_PARAMS is what --inner-params offers: here the head alone is fast."""
    fast_names = []

    def head_start(model, generator, outer_peft):
        phi = episodes.peft_start(model, generator, outer_peft)
        fast_names.append(sorted(n for n in phi if n.startswith("classifier")))
        return {n: t for n, t in phi.items() if n.startswith("classifier")}
    monkeypatch.setitem(episodes.INNER_PARAMS, "head", head_start)
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, tmp_path / "p", "--steps", "1", "--eval-every", "0",
                                  "--inner-params", "head"))
    assert fast_names == [["classifier.bias", "classifier.weight"]] * 2   # one phi_0 per task


def test_the_inner_optimizer_sgd_is_the_papers_step():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    fast = maml.inner_loop(lambda f, b: (f["w"] ** 2).sum(), {"w": w}, None, steps=1, lr=0.25)
    assert torch.allclose(fast["w"], w - 0.25 * 2 * w)


def test_evaluation_mode_restores_the_mode_even_after_an_error():
    model = torch.nn.Dropout(0.5).train()
    with pytest.raises(RuntimeError), evaluation_mode(model):
        assert not model.training
        raise RuntimeError("inside")
    assert model.training
    with evaluation_mode(model.eval()):
        pass
    assert not model.training


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
