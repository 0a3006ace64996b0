"""The fast training path on CPU (tasks/train/fastpath.py): the fused LoRA function against plain PEFT on a
tiny NF4 model, document boundaries for varlen attention, the mask fallback, and the config switches.
The CUDA-only parts (the varlen kernel itself, offload) are in tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from tasks.core.config import QuantizationConfig, TrainConfig
from tasks.train import fastpath


# ------------------------------------------------------------------ document boundaries
def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([
        [0, 1, 2, 0, 1, 0, 1, 2],   # three documents, the last one cut at the end of the row
        [5, 6, 7, 0, 1, 2, 3, 4],   # starts mid-document (continued from the row before), then a new one
        [0, 1, 2, 3, 4, 0, 1, 2],   # a document, then padding (collate restarts positions on padding)
    ])
    cu = fastpath.cu_seqlens_from_position_ids(pos)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 8, 11, 16, 21, 24]
    # one unbroken row is one sequence; rows never join even when positions would continue across them
    assert fastpath.cu_seqlens_from_position_ids(torch.arange(16).view(2, 8)).tolist() == [0, 8, 16]


def test_cu_seqlens_built_once_per_forward(monkeypatch):
    """Every layer gets the model's one position_ids object: cu_seqlens (a host sync for nonzero on a
    GPU) is built for the first layer only, and again only for another batch."""
    calls = []
    real = fastpath.cu_seqlens_from_position_ids
    monkeypatch.setattr(fastpath, "cu_seqlens_from_position_ids", lambda p: calls.append(1) or real(p))
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])  # (1, S), expanded to the batch as the model passes it
    first = fastpath._cu_for(pos, 2, 8, "cpu")
    assert all(fastpath._cu_for(pos, 2, 8, "cpu") is first for _ in range(40)) and len(calls) == 1
    assert first.tolist() == [0, 3, 8, 11, 16]
    assert fastpath._cu_for(pos.clone(), 2, 8, "cpu").tolist() == [0, 3, 8, 11, 16] and len(calls) == 2
    assert fastpath._cu_for(None, 2, 8, "cpu").tolist() == [0, 8, 16] and len(calls) == 2  # no documents: no sync
    fastpath._cu_for(pos, 2, 8, "cpu")
    assert len(calls) == 3
    pos[0, 3:] = torch.arange(3, 8)  # the same tensor changed in place: one document now
    assert fastpath._cu_for(pos, 2, 8, "cpu").tolist() == [0, 8, 16] and len(calls) == 4


def _per_document_reference(q, k, v, pos):
    """Each document on its own through plain causal SDPA (GQA by repeating KV heads)."""
    rep = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    starts = fastpath.doc_starts(pos)
    for b in range(q.shape[0]):
        edges = torch.nonzero(starts[b]).flatten().tolist() + [q.shape[2]]
        for a, e in zip(edges[:-1], edges[1:]):
            out[b, :, a:e] = torch.nn.functional.scaled_dot_product_attention(
                q[b:b + 1, :, a:e], k[b:b + 1, :, a:e].repeat_interleave(rep, 1),
                v[b:b + 1, :, a:e].repeat_interleave(rep, 1), is_causal=True)[0]
    return out.transpose(1, 2)


def test_attention_fallback_stays_inside_documents():
    torch.manual_seed(0)
    b, hq, hkv, s, d = 2, 4, 2, 12, 8
    q, k, v = torch.randn(b, hq, s, d), torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4], [7, 8, 9, 0, 1, 2, 3, 4, 5, 0, 1, 2]])
    out, _ = fastpath.varlen_attention_forward(None, q, k, v, None, scaling=d ** -0.5, position_ids=pos)
    ref = _per_document_reference(q, k, v, pos)
    assert out.shape == (b, s, hq, d)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # and it is not the plain causal result: a later document would see an earlier one otherwise
    plain = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                             is_causal=True).transpose(1, 2)
    assert (out - plain).abs().max() > 1e-3


def test_varlen_implementation_through_transformers_matches_sdpa_mask_path(tiny_model_dir):
    """Registered as an attention implementation, fed position_ids by the model, it gives the logits
    transformers' own per-document mask path gives (CPU: the mask fallback)."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    pos = torch.tensor([list(range(6)) + list(range(10)), list(range(3)) + list(range(9)) + list(range(4))])
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                attn_implementation=fastpath.register_attention())
    assert ours.config._attn_implementation == fastpath.VARLEN_ATTN
    with torch.no_grad():  # use_cache=False as in training: with a cache transformers builds no document mask
        a = ref(input_ids=ids, position_ids=pos, use_cache=False).logits
        b = ours(input_ids=ids, position_ids=pos, use_cache=False).logits
        unmasked = ours(input_ids=ids, use_cache=False).logits
        starts = fastpath.doc_starts(pos)
        for r in range(2):  # and each document on its own gives the same logits
            edges = torch.nonzero(starts[r]).flatten().tolist() + [16]
            for s, e in zip(edges[:-1], edges[1:]):
                alone = ref(input_ids=ids[r:r + 1, s:e], use_cache=False).logits[0]
                torch.testing.assert_close(b[r, s:e], alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert (b - unmasked).abs().max() > 1e-3  # the boundaries did change something


# --------------------------------------------------------------------------- fast LoRA
def _nf4_peft(model_dir, dropout=0.0, r=4, seed=0, compute_dtype="float32"):
    from peft import LoraConfig, get_peft_model

    from tasks.core.model import load_base

    cfg_model = type("M", (), {})()  # load_base reads only these attributes of ModelConfig
    cfg_model.quantization = QuantizationConfig(compute_dtype=compute_dtype)
    cfg_model.revision, cfg_model.trust_remote_code = None, False
    base = load_base(str(model_dir), cfg_model)
    torch.manual_seed(seed)
    m = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                        target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed + 1)
    for n, p in m.named_parameters():
        if "lora_B" in n:  # LoRA starts B at zero; a random B makes every gradient non-trivial
            p.data = torch.randn(p.shape, generator=g) * 0.1
    return m


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def test_fast_lora_matches_peft_outputs_and_gradients(tiny_model_dir):
    plain, fast = _nf4_peft(tiny_model_dir), _nf4_peft(tiny_model_dir)
    n = fastpath.enable_fast_lora(fast)
    assert n == 2 * 3  # q, k, v in both layers
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(2))
    outs = {}
    for name, m in (("plain", plain), ("fast", fast)):
        m.train()
        emb = m.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = m(inputs_embeds=emb, labels=ids).loss
        loss.backward()
        outs[name] = (loss.detach(), emb.grad, _grads(m))
    (l0, x0, g0), (l1, x1, g1) = outs["plain"], outs["fast"]
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x1, x0, rtol=1e-4, atol=1e-6)  # the input gradient (through base W and LoRA)
    assert g0.keys() == g1.keys() and len(g0) == 12
    for k in g0:
        assert g0[k].abs().max() > 0, k
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=k)


def test_fast_lora_returns_the_callers_dtype(tiny_model_dir):
    """bf16 compute, float32 hidden states: the output comes back in float32, as from PEFT's forward."""
    plain, fast = _nf4_peft(tiny_model_dir, compute_dtype="bfloat16"), _nf4_peft(tiny_model_dir, compute_dtype="bfloat16")
    fastpath.enable_fast_lora(fast)
    x = torch.randn(2, 3, fast.base_model.model.model.layers[0].self_attn.q_proj.in_features)
    for m in (plain, fast):
        m.train()
    with torch.enable_grad():
        a = plain.base_model.model.model.layers[0].self_attn.q_proj(x)
        b = fast.base_model.model.model.layers[0].self_attn.q_proj(x)
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3)


def test_fast_lora_dropout_uses_one_mask_forward_and_backward(tiny_model_dir):
    """With dropout the function draws its mask from a seed and regenerates it in the backward:
    output and gradients equal those of the same math with that mask, written out in autograd."""
    import bitsandbytes.functional as F

    m = _nf4_peft(tiny_model_dir, dropout=0.5)
    fastpath.enable_fast_lora(m)
    m.train()
    layer = m.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    torch.manual_seed(42)
    y = layer(x)
    y.backward(torch.ones_like(y))
    torch.manual_seed(42)
    seed = fastpath._draw_seed()
    keep = fastpath.dropout_mask(x.shape, 0.5, seed, x.device, x.dtype)
    assert set(keep.unique().tolist()) == {0.0, 1.0} and 0.4 < keep.mean() < 0.6
    mask = keep / (1 - 0.5)  # nn.Dropout's scaling
    w = F.dequantize_4bit(layer.base_layer.weight.view(-1, 1), layer.base_layer.weight.quant_state)
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    yr = xr @ w.t() + layer.scaling["default"] * ((xr * mask) @ a.t()) @ b.t()
    yr.backward(torch.ones_like(yr))
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_fast_lora_trains_and_saves_a_plain_peft_adapter(tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    m = _nf4_peft(tiny_model_dir)
    for n, p in m.named_parameters():  # the real start: B = 0
        if "lora_B" in n:
            p.data.zero_()
    fastpath.enable_fast_lora(m)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(3))
    m.train()
    losses = []
    for _ in range(3):  # step 1 moves B only (A's gradient is zero while B is); then A moves too
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), before[n]), f"{n} did not change"
    m.save_pretrained(tmp_path / "fast")
    saved = load_file(tmp_path / "fast" / "adapter_model.safetensors")
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                      task_type="CAUSAL_LM"))
    plain.save_pretrained(tmp_path / "plain")
    assert saved.keys() == load_file(tmp_path / "plain" / "adapter_model.safetensors").keys()
    # plain PEFT loads it over the same NF4 base and gives the trained model's outputs exactly
    loaded = PeftModel.from_pretrained(_nf4_peft(tiny_model_dir).unload(), tmp_path / "fast")
    m.eval()
    with torch.no_grad():
        a, b = m(input_ids=ids).logits, loaded(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fast_lora_keeps_cpu_inference_repack_off(tiny_model_dir):
    """An eval forward under no_grad (PEFT's own forward) must not repack the 4-bit weights into the
    inference-only AVX512-BF16 layout: training afterwards still gets gradients, and equal ones."""
    import bitsandbytes as bnb

    m = _nf4_peft(tiny_model_dir)
    fastpath.enable_fast_lora(m)
    lin4 = [mod for mod in m.modules() if isinstance(mod, bnb.nn.Linear4bit)]
    assert lin4 and all(mod.support_avx512bf16_for_cpu is False for mod in lin4)
    ids = torch.randint(3, 200, (1, 10), generator=torch.Generator().manual_seed(4))
    m.eval()
    with torch.no_grad():
        m(input_ids=ids)
    assert not any(getattr(mod.weight.quant_state, "packing_format_for_cpu", False) for mod in lin4)
    m.train()
    m(input_ids=ids, labels=ids).loss.backward()
    g = _grads(m)
    assert all(v.abs().max() > 0 for k, v in g.items() if "lora_A" in k)
    assert fastpath.disable_fast_lora(m) == 6 and fastpath.enable_fast_lora(m) == 6


# ------------------------------------------------------------------------ recompute, config
def test_recompute_layers_checkpoints_only_the_first_n(tiny_model_dir):
    m = _nf4_peft(tiny_model_dir)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(5))
    m.train()
    m(input_ids=ids, labels=ids).loss.backward()
    ref = _grads(m)
    m.zero_grad()
    fp = fastpath.resolve(TrainConfig(recompute_layers=1, liger_kernel=False, attention="sdpa"), cuda=False)
    fastpath.prepare_base(m.base_model.model, fp)
    fastpath.prepare_peft(m, fp)
    layers = fastpath.decoder_layers(m)
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    m(input_ids=ids, labels=ids).loss.backward()
    for k, v in _grads(m).items():
        torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-6)


def test_config_switches_validate_and_resolve():
    tc = TrainConfig()
    assert (tc.attention, tc.fast_lora, tc.liger_kernel, tc.recompute_layers, tc.activation_offload) == \
        ("auto", True, "auto", None, False)
    cpu = fastpath.resolve(tc, cuda=False)
    assert (cpu.attention, cpu.liger, cpu.fast_lora, cpu.offload, cpu.attn_implementation) == \
        ("sdpa", False, True, False, None)
    gpu = fastpath.resolve(TrainConfig(activation_offload=True), cuda=True)
    assert gpu.offload and gpu.recompute
    if fastpath.varlen_kernel() is not None:
        assert gpu.attention == "varlen" and gpu.attn_implementation == fastpath.VARLEN_ATTN
    assert fastpath.resolve(tc, cuda=True, fsdp=True).fast_lora is False
    assert fastpath.resolve(TrainConfig(attention="sdpa", liger_kernel=False), cuda=True).attn_implementation is None
    with pytest.raises(ValueError, match="needs gradient_checkpointing"):
        TrainConfig(gradient_checkpointing=False, activation_offload=True)
    with pytest.raises(ValueError, match="needs gradient_checkpointing"):
        TrainConfig(gradient_checkpointing=False, recompute_layers=4)
    with pytest.raises(ValueError):
        TrainConfig(attention="flash")
    with pytest.raises(ValueError):
        TrainConfig(recompute_layers=-1)
    assert TrainConfig(liger_kernel=True).liger_kernel is True  # plain booleans still work (bench_scaling)
