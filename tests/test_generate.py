"""Using a trained adapter: ask, streamed multi-turn chat, batch JSONL, base-vs-adapter compare,
on a tiny trained run (NF4 base + LoRA, CPU, seconds)."""

import io
import json
import shutil

import pytest
from conftest import prepare_tokenized as _prepare

from tasks.core.config import GenerateConfig, QuantizationConfig


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    from tasks.train.stage import run_train

    root = tmp_path_factory.mktemp("gen")
    cfg = _prepare(root, tiny_model_dir, train={"max_steps": 4, "eval_every": 100, "save_every": 100},
                   generate={"max_new_tokens": 6})
    m = run_train(cfg)
    return root / "runs" / m["run_dir"].split("/")[-1]


@pytest.fixture(scope="module")
def loaded(run):
    from tasks.adapter.generate import load_for_inference

    return load_for_inference(run)


GEN = GenerateConfig(max_new_tokens=6)


def _write(path, lines):
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


def test_batch_answers_the_rest_and_reports_bad_lines(loaded, tmp_path):
    from tasks.adapter.generate import run_batch

    model, tok = loaded
    prompts = _write(tmp_path / "p.jsonl", [
        json.dumps({"id": 1, "prompt": "Lentil soup?"}),
        '{"id": 2, "prompt": "broken',                       # line 2: not JSON
        json.dumps({"id": 3, "prompt": "   "}),               # line 3: empty prompt
        "",                                                   # blank: skipped silently
        json.dumps({"id": 5}),                                # line 5: no prompt
        json.dumps({"id": 1, "prompt": "again"}),             # line 6: duplicate id
        b'{"id": 7, "prompt": "caf\xe9"}',                    # line 7: not UTF-8
        json.dumps(["not", "an", "object"]),                  # line 8
        json.dumps({"id": "x", "prompt": "lemon " * 300}),    # line 9: longer than the context
        json.dumps({"id": "last", "prompt": "Citric acid?"}),
    ])
    out = tmp_path / "answers.jsonl"
    s = run_batch(model, tok, prompts, out, GEN, progress=False)
    answers = [json.loads(x) for x in out.read_text().splitlines()]
    assert [a["id"] for a in answers] == [1, "last"]
    assert all(isinstance(a["answer"], str) for a in answers) and answers[1]["line"] == 10
    rejects = [json.loads(x) for x in (tmp_path / "answers.jsonl.rejects.jsonl").read_text().splitlines()]
    by_line = {r["line"]: r["reason"] for r in rejects}
    assert sorted(by_line) == [2, 3, 5, 6, 7, 8, 9]
    assert "not valid JSON" in by_line[2] and by_line[3] == "empty prompt"
    assert "missing field 'prompt'" in by_line[5] and "duplicate id 1 (first on line 1)" in by_line[6]
    assert "UTF-8" in by_line[7] and "context" in by_line[9]
    assert all(r["file"] == str(prompts) for r in rejects)
    assert s["answered"] == 2 and s["rejected"] == 7
    assert not (tmp_path / "answers.jsonl.partial").exists()


def test_batch_output_only_appears_when_complete(loaded, tmp_path, monkeypatch):
    """An interrupted batch leaves <out>.partial and the previous complete output untouched."""
    import tasks.adapter.generate as g

    model, tok = loaded
    prompts = _write(tmp_path / "p.jsonl", [json.dumps({"id": i, "prompt": f"Soup {i}?"}) for i in range(3)])
    out = tmp_path / "a.jsonl"
    out.write_text("previous complete output\n")
    calls = {"n": 0}
    real = g.reply

    def interrupted(*args, **kw):  # fault injection: the process is stopped during the 2nd prompt
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(g, "reply", interrupted)
    with pytest.raises(KeyboardInterrupt):
        g.run_batch(model, tok, prompts, out, GEN, progress=False)
    assert out.read_text() == "previous complete output\n"
    assert len((tmp_path / "a.jsonl.partial").read_text().splitlines()) == 1
    monkeypatch.setattr(g, "reply", real)
    g.run_batch(model, tok, prompts, out, GEN, progress=False)
    assert len(out.read_text().splitlines()) == 3
    assert not (tmp_path / "a.jsonl.partial").exists() and not (tmp_path / "a.jsonl.rejects.jsonl").exists()


def test_empty_prompt_refused(run, loaded):
    from tasks.adapter.generate import chat, run_generate

    with pytest.raises(ValueError, match="empty prompt"):
        run_generate(run, "  \n ")
    with pytest.raises(ValueError, match="empty prompt"):
        chat(*loaded, "", GEN)


def test_sampling_settings_validated_and_seeded(loaded):
    from tasks.adapter.generate import chat, gen_settings

    with pytest.raises(Exception, match="temperature"):
        gen_settings(GEN, temperature=-1)
    hot = gen_settings(GEN, temperature=1.5, top_p=0.9, seed=7)
    assert hot.max_new_tokens == 6 and hot.seed == 7
    a, b = chat(*loaded, "Lentil soup?", hot), chat(*loaded, "Lentil soup?", hot)
    assert a == b  # the seed is reset before every answer


def test_chat_session_keeps_history_and_streams(loaded):
    from tasks.adapter.generate import chat_session

    model, tok = loaded
    inputs = iter(["Lentil soup?", "  ", "And with lemon?", "/exit", "never read"])
    out = io.StringIO()
    history = chat_session(model, tok, GEN, read=lambda _p: next(inputs), out=out)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[2]["content"] == "And with lemon?"
    text = out.getvalue()
    assert "empty prompt" in text and text.count("model> ") == 2
    for m in history[1::2]:
        assert m["content"] in text  # the answers were streamed to the output
    assert next(inputs) == "never read"


def test_compare_lists_base_and_adapter(run, tmp_path):
    from tasks.adapter.generate import run_compare

    md, res = run_compare(run, ["Lentil soup?", "Citric acid?"], tmp_path / "cmp.md", GEN)
    assert (tmp_path / "cmp.md").read_text() == md
    assert json.loads((tmp_path / "cmp.json").read_text())["rows"] == res["rows"]
    assert "| # | prompt | base | adapter |" in md
    for r in res["rows"]:
        assert set(r) == {"prompt", "base", "adapter", "same"}
        assert r["prompt"] in md
    assert res["quantization"]["quant_type"] == "nf4"
    with pytest.raises(ValueError, match="empty prompt"):
        run_compare(run, ["ok", ""], tmp_path / "x.md", GEN)


def test_mismatched_quantization_refused(run, capsys):
    from tasks.adapter.generate import load_for_inference, main

    with pytest.raises(ValueError, match="quantization mismatch.*compute_dtype: trained with 'float32'"):
        load_for_inference(run, QuantizationConfig(compute_dtype="bfloat16"))
    with pytest.raises(SystemExit) as e:
        main(["--run", str(run), "--prompt", "hi", "--quant", "compute_dtype=bfloat16"])
    assert e.value.code == 2 and "quantization mismatch" in capsys.readouterr().err


def test_cli_batch_and_ask(run, tmp_path, capsys):
    from tasks.adapter.generate import main

    prompts = _write(tmp_path / "p.jsonl", [json.dumps({"id": "a", "prompt": "Soup?"}), "{oops"])
    main(["batch", "--run", str(run), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
          "--no-progress", "--max-new-tokens", "3"])
    err = capsys.readouterr().err
    assert "1 answered" in err and "1 rejected" in err and "p.jsonl:2: not valid JSON" in err
    main(["--run", str(run), "--prompt", "Soup?", "--max-new-tokens", "3"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["batch", "--run", str(run), "--prompts", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")])
    assert "missing.jsonl not found" in capsys.readouterr().err


def test_adapter_for_another_architecture_refused(run):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.adapter.generate import attach_adapter

    other = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"_proj.lora_A.weight has shape \[4, 64\].*in_features=32"):
        attach_adapter(other, run)


def test_missing_base_named(run, tmp_path):
    from tasks.adapter.generate import load_run_base

    moved = tmp_path / "run"
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    rec = json.loads((moved / "adapter" / "quantization.json").read_text())
    rec["base_path"] = str(tmp_path / "gone")
    (moved / "adapter" / "quantization.json").write_text(json.dumps(rec))
    with pytest.raises(FileNotFoundError, match="gone.*recorded as base_path in .*quantization.json"):
        load_run_base(moved)
