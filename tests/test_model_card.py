"""The model card (README.md) of a primed folder: hub front matter, how it was primed, resume."""
import json

import pytest
from conftest import prime_argv

import maml
import meta_pretrain
from plumbing import model_card
from plumbing.cli import run_cli


def front_matter(text):
    """The YAML header of a card, parsed by hand: `key: value` and `key:` + `- item` lines."""
    lines = text.splitlines()
    assert lines[0] == "---"
    header = lines[1:lines.index("---", 1)]
    fields, key = {}, None
    for line in header:
        if line.startswith("- "):
            fields[key].append(json.loads(line[2:]))
        else:
            key, _, value = line.partition(":")
            fields[key] = json.loads(value) if value.strip() else []
    return fields


def test_a_finished_priming_run_has_a_card(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "primed"
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out, "--first-order"))
    text = (out / "README.md").read_text()
    fields = front_matter(text)
    assert fields == {"language": ["en", "de", "es"], "library_name": "transformers",
                      "datasets": ["unimelb-nlp/wikiann"],
                      "tags": ["peft-priming", "maml", "adapter", "named-entity-recognition", "cross-lingual"]}
    record = json.loads((out / "run.json").read_text())
    body = text.split("---", 2)[2]
    assert f"`{tiny_model_dir}` primed for adapter fine-tuning" in body          # the base model (a local folder)
    assert "MAML priming (first-order) for adapter fine-tuning: 2 inner SGD steps at lr 0.3" in body
    assert '"first_order": true' in body and '"inner_steps": 2' in body and '"data_dir": "' + data_dir in body
    assert f"commit `{record['code_version']}`" in body and f"{record['body_change']:.6f}" in body
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for line in [entry for entry in logged if "held_out_query_loss" in entry]:                    # steps 2 and 3
        row = f"| {line['step']} | {line['held_out_query_loss']:.4f} | {line['held_out_query_loss_fresh']:.4f} |"
        assert row in body
    assert f"finetune_peft.py --init {out} --peft adapter" in body and f'AutoModel.from_pretrained("{out}")' in body


def test_the_hub_reads_the_card(tiny_model_dir, data_dir, tmp_path):
    hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub is not installed")
    out = tmp_path / "primed"
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out, "--method", "mtl"))
    card = hub.ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.language == ["en", "de", "es"]
    assert "multi-task-learning" in card.data.tags and "multi-task priming (MTL)" in card.text


def test_base_model_and_datasets_of_the_front_matter(tmp_path):
    args = vars(meta_pretrain.build_parser().parse_args(["--peft", "prefix", "--priming-langs", "de,en,es"]))
    fields = front_matter(model_card.card_text(tmp_path, args))
    assert fields["base_model"] == "intfloat/multilingual-e5-small"   # the default e5-small's original
    assert fields["language"] == ["en", "de", "es"] and "prefix" in fields["tags"]
    hub = {**args, "model": "xlm-roberta-base", "data_format": "conll", "data_dir": str(tmp_path)}
    fields = front_matter(model_card.card_text(tmp_path, hub))
    assert fields["base_model"] == "xlm-roberta-base" and "datasets" not in fields   # a CoNLL folder: no hub dataset
    assert "No held-out evaluation was logged" in model_card.card_text(tmp_path, hub)


def test_the_card_comes_with_the_finished_model_and_follows_resume(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "p"
    real, calls = maml.meta_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(maml, "meta_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out))
    monkeypatch.undo()
    assert not (out / "README.md").exists()                       # an unfinished run is no model to describe
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out, "--resume"))
    assert "- meta-steps: 3," in (out / "README.md").read_text()
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out, "--resume", "--steps", "4"))   # extended
    text = (out / "README.md").read_text()
    assert "- meta-steps: 4," in text and "| 4 |" in text and not list(out.glob("README.md.tmp-*"))
    calls.clear()
    monkeypatch.setattr(maml, "meta_step", interrupted)
    with pytest.raises(KeyboardInterrupt):                             # extended again, killed at its third step
        meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out, "--resume", "--steps", "7"))
    assert not (out / "README.md").exists()                       # no card of the 4-step body beside a 6-step state


def test_the_card_of_an_existing_run_is_written_on_request(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "p"
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out))
    first = (out / "README.md").read_text()
    (out / "README.md").unlink()                                   # a run primed before cards existed
    model_card.main([str(out)])
    assert (out / "README.md").read_text() == first
    with pytest.raises(SystemExit) as stop:
        run_cli(model_card.main, [str(tmp_path)])
    assert stop.value.code == 2 and "holds no finished meta_pretrain.py run" in capsys.readouterr().err
