"""Nothing of the user's touched, every message true (issue 38, the remaining cases): a resume.pt
continues only its own run, --overwrite deletes only a run's files, exports never replace a user's
file, and bad records, data and flags are one line naming the file or flag. One fault injected per
test, on a tiny model."""
import json
import shutil

import pytest

from test_provenance import contents, evaluate_argv
from test_robustness import error_of, prime_argv, primed, tune_argv, tuned  # noqa: F401 (fixtures)

import evaluate_ner
import finetune_peft
import meta_pretrain


# ----------------------------------------------------------------------------- resume.pt names its run

@pytest.mark.parametrize("flag, value", [("--seed", "5"), ("--peft", "lora")])
def test_another_runs_resume_state_is_refused(tiny_model_dir, data_dir, primed, tmp_path, capsys, flag, value):
    mine, theirs = tmp_path / "p", tmp_path / "other"
    shutil.copytree(primed, mine)
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, theirs, flag, value))
    shutil.copy(theirs / "resume.pt", mine / "resume.pt")        # another run's state copied in
    before = contents(mine)
    message = error_of(meta_pretrain.main, prime_argv(tiny_model_dir, data_dir, mine, "--resume", "--steps", "3"),
                       capsys)
    assert f"{mine / 'resume.pt'} belongs to another run ({flag} {value} there" in message
    assert contents(mine) == before
