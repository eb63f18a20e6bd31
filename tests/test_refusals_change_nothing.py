"""A refusal changes nothing (issue 45): every "nothing was changed" is true. Each refusal of a rerun
on an interrupted priming run leaves the folder's listing and bytes as they were."""
import shutil

import pytest
from test_provenance import contents
from test_robustness import error_of, interrupt, prime_argv

import maml
import meta_pretrain


@pytest.fixture(scope="module")
def interrupted(tiny_model_dir, data_dir, tmp_path_factory):
    """A priming run stopped by Ctrl-C after its first resume.pt."""
    out = tmp_path_factory.mktemp("interrupted") / "p"
    with pytest.MonkeyPatch.context() as patch:
        interrupt(patch, maml, "meta_step", after=1)
        with pytest.raises(KeyboardInterrupt):
            meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out))
    assert (out / "resume.pt").is_file()
    return out


@pytest.mark.parametrize("extra, said", [
    (["--resume", "--overwrite"], "--resume continues the run in --out, --overwrite deletes it"),
    (["--overwrite", "--resume", "--steps", "4"], "--resume continues the run in --out, --overwrite deletes it"),
    ([], "holds an interrupted meta_pretrain run"),
    (["--resume", "--seed", "3"], "--resume: --seed is 3 here"),
])
def test_a_refused_rerun_changes_nothing(tiny_model_dir, data_dir, interrupted, tmp_path, capsys, extra, said):
    out = tmp_path / "p"
    shutil.copytree(interrupted, out)
    before = contents(out)
    message = error_of(meta_pretrain.main, prime_argv(tiny_model_dir, data_dir, out, *extra), capsys)
    assert said in message
    assert contents(out) == before


class Payload:
    """What a hostile resume.pt holds: unpickling it creates `marker` (it could as well run any command)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_resume_state_that_would_run_code_is_refused_unrun(tiny_model_dir, data_dir, interrupted, tmp_path,
                                                             capsys):
    import torch
    out, marker = tmp_path / "p", tmp_path / "ran"
    shutil.copytree(interrupted, out)
    state = torch.load(out / "resume.pt", weights_only=True)
    torch.save({**state, "run": Payload(marker)}, out / "resume.pt")      # a received resume.pt
    before = contents(out)
    message = error_of(meta_pretrain.main, prime_argv(tiny_model_dir, data_dir, out, "--resume"), capsys)
    assert f"{out / 'resume.pt'} holds more than tensors and plain data" in message
    assert not marker.exists()                                             # its code never ran
    assert contents(out) == before
