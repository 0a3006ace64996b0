"""The scaling/resume benchmark's own logic (the GPU run itself is reported in the README)."""

import pytest

from benchmarks.bench_scaling import _config, hf_tekken, throughput


def test_throughput_is_measured_after_warmup_on_rank0_clock():
    recs = [{"step": 0, "event": "startup", "time": 0.0}]
    recs += [{"step": s, "loss": 1.0, "tokens_seen": 8192 * s, "time": 10.0 + 2.0 * s + (5.0 if s == 1 else 0.0),
              "gpu_peak_gib": 19.0 + s / 10} for s in range(1, 11)]
    recs[1]["time"] = 7.0  # step 1 is slow (compilation, allocator warm-up): it must not count
    tps, peak = throughput(recs, warmup=3)
    assert tps == pytest.approx(8192 * 7 / 14.0)
    assert peak == pytest.approx(20.0)


def test_configs_use_the_production_recipe_and_the_launcher_the_stage_would():
    from tasks.train.stage import launch_command

    one = _config("/tmp/x", "/tmp/m", world=1, micro=4, steps=10)
    two = _config("/tmp/x", "/tmp/m", world=2, micro=4, steps=10, liger="true")
    assert one.lora.target_modules == ["q_proj", "k_proj", "v_proj"] and one.lora.r == 32  # the production config
    assert (one.train.micro_batch_size, one.train.grad_accum, one.train.max_steps) == (4, 1, 10)
    assert one.model.tokenizer is None and two.train.liger_kernel
    assert launch_command(one, "/tmp/run")[1:3] == ["-m", "tasks.train"]  # one GPU: plain python
    cmd = launch_command(two, "/tmp/run")
    assert "accelerate.commands.launch" in cmd and cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[cmd.index("--config_file") + 1].endswith("configs/accelerate/ddp.yaml")


def test_converted_tekken_gives_mistral_commons_ids(tmp_path):
    golden = ["Crème brûlée: 250 ml double cream, 4 yolks.", "E330 ≤ 0.5 % — 'citric acid'", "def f(x):\n    return x"]
    tok = hf_tekken(tmp_path / "tok", golden)  # raises on any mismatch
    assert len(tok) == 131072 and tok.encode("salt", add_special_tokens=False)
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
