"""compare.py's bookkeeping: skipping finished runs, mean and std over seeds, the table."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import compare


def write_eval(path, f1s):
    path.parent.mkdir(parents=True, exist_ok=True)
    results = {lang: {"precision": 0, "recall": 0, "f1": f} for lang, f in f1s.items()}
    results["average"] = {"f1": sum(f1s.values()) / len(f1s)}
    path.write_text(json.dumps({"results": results}))
    return path


def test_collect_mean_and_std_over_seeds(tmp_path):
    files = [write_eval(tmp_path / f"s{i}.json", {"fr": f, "nl": 50.0}) for i, f in enumerate([60.0, 62.0, 64.0])]
    table = compare.collect(files, ["fr", "nl"])
    assert table["seeds"] == 3 and table["fr"] == (62.0, 2.0) and table["nl"] == (50.0, 0.0)
    assert table["average"] == (56.0, 1.0)
    text = compare.markdown({("adapter", "MAML priming"): table}, ["fr", "nl"])
    assert "| adapter | MAML priming | 3 | 62.00 ± 2.00 | 50.00 ± 0.00 | 56.00 ± 1.00 |" in text


def test_finished_runs_are_skipped(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    marker = tmp_path / "done.json"
    marker.write_text("{}")
    compare.run_stage("evaluate_ner.py", [], marker)
    compare.run_stage("evaluate_ner.py", [], tmp_path / "missing.json")
    assert len(calls) == 1


def test_priming_and_target_languages_must_differ(tmp_path):
    run = subprocess.run([sys.executable, str(Path(compare.__file__)), "--langs", "fr,de", "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "both a priming and a target language" in run.stderr


def test_main_rows_run_first_and_the_table_keeps_the_papers_order(tmp_path, monkeypatch):
    ran = []

    def fake_run(args, runs, peft, condition, seed, **kwargs):
        ran.append((peft, condition, seed))
        return write_eval(tmp_path / f"{peft}-{condition}-{seed}.json".replace(" ", "_").replace(":", ""),
                          {"fr": 60.0 + seed, "nl": 50.0, "pt": 40.0})

    monkeypatch.setattr(compare, "one_run", fake_run)
    monkeypatch.setattr(compare, "plot_f1", lambda *a: None)
    monkeypatch.setattr(compare, "plot_curves", lambda *a: None)
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path / "out"), "--seeds", "2"])
    compare.main()
    main_runs = [r for r in ran if r[1] in compare.MAIN_ROWS and r[0] != "full"]
    assert ran[:len(main_runs)] == main_runs                       # every main row before any ablation
    assert len(main_runs) == 2 * 3 * 2                             # 2 PEFTs x 3 rows x 2 seeds
    assert ran[-1] == ("full", "no priming", 0) and ran.count(("full", "no priming", 0)) == 1
    lines = (tmp_path / "out" / "table.md").read_text().splitlines()[2:]
    expected = [f"| {p} | {c} |" for p in ("adapter", "prefix") for c in compare.CONDITIONS] + ["| full | full"]
    assert [l[:len(e)] for l, e in zip(lines, expected)] == expected
    assert "| adapter | no priming | 2 | 60.50 ± 0.71 |" in lines[0]


def test_body_change_is_the_relative_change_of_non_embedding_weights(tmp_path):
    import torch
    from safetensors.torch import save_file
    before, after = tmp_path / "before", tmp_path / "primed-x"
    for folder in (before, after):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    weights = {"embeddings.word_embeddings.weight": torch.ones(10, 4), "encoder.layer.0.w": torch.full((3, 4), 2.0)}
    save_file(weights, str(before / "model.safetensors"))
    assert compare.body_change(before, str(before)) == 0.0
    moved = dict(weights, **{"embeddings.word_embeddings.weight": torch.zeros(10, 4),   # embeddings: ignored
                             "encoder.layer.0.w": torch.full((3, 4), 2.2)})
    save_file(moved, str(after / "model.safetensors"))
    assert abs(compare.body_change(after, str(before)) - 0.1) < 1e-6                  # 0.2 / 2.0 in every entry
    table = {("adapter", "MAML priming"): {"seeds": 1}, ("adapter", "no priming"): {"seeds": 1}}
    compare.add_body_change(table, {("adapter", "MAML priming"): [tmp_path / "ft-x"],
                                    ("adapter", "no priming"): [tmp_path / "ft-y"]}, str(before))
    assert abs(table[("adapter", "MAML priming")]["body_change"] - 0.1) < 1e-6
    assert "body_change" not in table[("adapter", "no priming")]


def test_one_seed_rows_show_no_standard_deviation():
    row = {"fr": (60.0, 0.0), "average": (60.0, 0.0), "seeds": 1}
    assert "| prefix | ablation: first-order | 1 | 60.00 | 60.00 |" in compare.markdown({("prefix", "ablation: first-order"): row}, ["fr"])
