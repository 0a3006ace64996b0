"""Mistral's Tekken tokenizer: the ids the pipeline writes equal the model tokenizer's, exactly.

The reference is mistral-common's own ``Tekkenizer.encode`` (what Mistral's models were trained
with); transformers' ``MistralCommonBackend`` (what ``load_tokenizer`` returns for
``model.tokenizer: mistral-common:tekken_240911.json``) and the pipeline's fast ``Encoder`` (the
tiktoken Encoding inside the Tekkenizer, called directly) must agree with it on every golden string,
and so must the ids read back from the packed shards after a real ``run_tokenize``.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core.config import ModelConfig, config_from_dict
from tasks.core.model import load_tokenizer, tokenizer_file, tokenizer_fingerprint
from tasks.tokenize.cache import Encoder, encode_job, tokenizer_ref
from tasks.tokenize.loader import PackedShards

SPEC = "mistral-common:tekken_240911.json"

GOLDEN = [
    "Red lentil soup",
    "Simmer for twenty minutes until the lentils collapse, then season with lemon and salt.",
    "E330 citric acid, 2 g/100 ml.",
    "def f(x):\n    return x",
    "Ingredients:\n- 200 g oat flour\n- 1 tsp salt\n\n\nSteps:\t1. Mix.  2. Bake at 180°C.",
    "Crème brûlée, jalapeño, Müsli, façade, naïve — “quotes” and ‘apostrophes’…",
    "Ærøskøbing smørrebrød; Straße; ½ cup; 3×4=12; ≤ 5 µg; ℃",
    "日本語のレシピ: 味噌汁を作る。中文：红烧肉。한국어 김치찌개",
    "emoji 🍅🥕🧄 and 👩‍🍳 zero-width joiner, flags 🇫🇷🇮🇹",
    "العربية: حمص بالطحينة — עברית: שקשוקה",
    "    leading spaces and trailing spaces    ",
    "\n\n\nnewlines\r\nwindows\rmac",
    "numbers 1234567890 3.14159 -42 1e-9 0x1F 1,000,000",
    "<s> </s> [INST] not special [/INST] <unk> <pad>",
    "a" * 500 + " " + "ab" * 300,
    "x",
    " ",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    "import numpy as np\nclass Kcal:\n    def __init__(self, p: float) -> None:\n        self.p = p  # protein\n",
    '{"@type": "Recipe", "name": "Soup", "recipeYield": "4 servings", "nutrition": {"calories": "120 kcal"}}',
]

# Literal ids from mistral-common 1.13 / tekken_240911.json: a changed tokenizer file fails here
PINNED = {
    "Red lentil soup": [12846, 23633, 1318, 32998],
    "E330 citric acid, 2 g/100 ml.": [1069, 1051, 1051, 1048, 8803, 2107, 6331, 1044, 1032, 1050, 1343, 1047, 1049,
                                      1048, 1048, 15489, 1046],
    "def f(x):\n    return x": [3149, 1284, 4790, 3640, 1293, 1850, 2460],
}


@pytest.fixture(scope="module")
def reference():
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(tokenizer_file(SPEC))).instruct_tokenizer.tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("mistralai/Mistral-Small-24B-Instruct-2501", ModelConfig(name="mistral", tokenizer=SPEC))


def test_backend_is_tekken_with_131k_vocab(tok, reference):
    assert type(tok).__name__ == "MistralCommonBackend"
    assert len(tok) == reference.n_words == 131072
    assert tok.eos_token_id == reference.eos_id and tok.pad_token_id is not None


def test_pinned_ids(reference):
    for s, ids in PINNED.items():
        assert reference.encode(s, bos=False, eos=False) == ids


def test_all_paths_equal_mistral_common(tok, reference, tmp_path):
    fast_obj = Encoder(tok=tok)
    ref = tokenizer_ref(tok, tokenizer_fingerprint(tok), tmp_path)
    assert ref.kind == "tekken"
    fast_ref = encode_job((ref, GOLDEN))  # what a worker process or Dask worker runs
    for s, a, b in zip(GOLDEN, fast_obj(GOLDEN), fast_ref):
        want = reference.encode(s, bos=False, eos=False)
        assert tok.encode(s, add_special_tokens=False) == want, s
        assert a.tolist() == want and b.tolist() == want, s
        assert a.dtype == np.uint32


def test_fingerprint_depends_on_the_file(tok):
    other = load_tokenizer("x", ModelConfig(name="x", tokenizer="mistral-common:tekken_240718.json"))
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(load_tokenizer("y", ModelConfig(name="y", tokenizer=SPEC)))
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(other)


def test_shards_hold_exactly_the_reference_ids(tmp_path, reference):
    """run_tokenize with the Tekken tokenizer (2 worker processes): packed, shuffled rows read back
    give each golden document's reference ids followed by EOS, as uint32."""
    cfg = config_from_dict({
        "data_root": str(tmp_path), "scrape": {"sources": "configs/sources/demo.yaml"},
        "model": {"name": "mistralai/Mistral-Small-24B-Instruct-2501", "tokenizer": SPEC},
        "tokenize": {"seq_len": 64, "rows_per_shard": 8, "workers": 2, "batch_docs": 4},
    })
    for _side, d in (("train", tmp_path / "mix" / "train"), ("eval", tmp_path / "split" / "eval")):
        d.mkdir(parents=True)
        pq.write_table(pa.table({"doc_id": [f"g{i}" for i in range(len(GOLDEN))], "text": GOLDEN,
                                 "repeat": pa.array([1] * len(GOLDEN), pa.int32())}), d / "recipes.parquet")
    (tmp_path / "mix" / "manifest.json").write_text(json.dumps({"fingerprint": "m"}))
    (tmp_path / "split" / "manifest.json").write_text(json.dumps({"fingerprint": "s"}))
    m = __import__("tasks.tokenize", fromlist=["run_tokenize"]).run_tokenize(cfg)
    assert m["id_dtype"] == "uint32" and m["vocab_size"] == 131072
    docs = [s for s in GOLDEN if s.strip()]  # the whitespace-only one is quarantined (once per split), not packed
    assert m["counts"]["quarantined"] == 2
    assert pq.read_table(out_dir(tmp_path, m) / "quarantine.parquet").column("row").to_pylist() == [16, 16]
    want_tokens = sum(len(reference.encode(s, bos=False, eos=False)) + 1 for s in docs)
    assert m["counts"]["train"]["tokens"] == want_tokens
    out = out_dir(tmp_path, m)
    # eval is not shuffled: its stream is the documents in order, each + EOS
    shards = PackedShards(out / "eval" / "recipes")
    rows = shards.rows(range(len(shards)))
    stream = [t for ids, n in zip(rows["input_ids"], rows["length"]) for t in ids[:n].tolist()]
    assert stream == [t for s in docs for t in reference.encode(s, bos=False, eos=True)]
    # train rows are shuffled: the multiset of tokens is the same
    tr = PackedShards(out / "train")
    trows = tr.rows(range(len(tr)))
    got = sorted(t for ids, n in zip(trows["input_ids"], trows["length"]) for t in ids[:n].tolist())
    assert got == sorted(stream)


def out_dir(root, m):
    return root / "tokenized" / m["tokenizer_fingerprint"][:16]
