"""The benchmark and planning scripts under ``eval/`` share the jobs' one command-line syntax.

Each script's flags are a frozen ``Args`` dataclass parsed by ``meg_jax.config.parse_cli``:
``--help`` lists every field with its default, and a bad field or value exits with status 2
naming it, before any work (or any JAX import where the script must set ``XLA_FLAGS`` first).
Parsed in process through each module's ``parse_args``: no subprocess, no benchmark run.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest

# module -> argv the script requires (its required fields), a bad value, a value its own check
# refuses, and the flag each of the two must name
SCRIPTS = {
    "eval.bench_blocks": ([], ["--repeats", "x"], "--repeats", ["--only", "resnet7"], "--only"),
    "eval.bench_backbone": ([], ["--tome_repeats", "x"], "--tome_repeats", ["--tome_side", "3"], "--tome_side"),
    "eval.bench_cvpo": ([], ["--batches", "x"], "--batches", ["--batches", "256", "0"], "--batches"),
    "eval.paper_system": ([], ["--episodes", "x"], "--episodes", ["--episodes", "1"], "--episodes"),
    "eval.bench_data": ([], ["--seconds", "x"], "--seconds", ["--read_threads", "0"], "--read_threads"),
    "eval.bench_env": ([], ["--repeats", "x"], "--repeats", ["--sizes", "64", "0"], "--sizes"),
    "eval.bench_pipeline": ([], ["--sd15_steps", "2.5"], "--sd15_steps", ["--threads", "0"], "--threads"),
    "eval.flops_table": ([], ["--no_torch", "--torch_threads", "2"], "--torch_threads", None, None),
    "eval.plan_distill": (["--model", "tiny", "--devices", "4"], ["--attention", "flash"], "--attention",
                          ["--model_axis", "3"], "--model_axis"),
}


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "240")  # one line per flag: no wrapping inside a flag's name


def _parse(module_name, argv):
    return importlib.import_module(module_name).parse_args(argv)


@pytest.mark.parametrize("module_name", sorted(SCRIPTS))
def test_help_lists_every_field_with_its_default(module_name, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(module_name, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    fields = dataclasses.fields(importlib.import_module(module_name).Args)
    shown = {word.rstrip(",") for line in out.splitlines() for word in line.split() if word.startswith("--")}
    missing = [f"--{f.name}" for f in fields if f"--{f.name}" not in shown]
    assert not missing, f"{module_name} --help lacks {missing}"
    # every option line ends with its default, or says it is required (plan_distill's --model, --devices)
    assert out.count("(default:") + out.count("(required)") >= len(fields)


@pytest.mark.parametrize("module_name", sorted(SCRIPTS))
def test_bad_value_exits_2_naming_the_flag(module_name, capsys):
    required, bad, named, refused, refused_named = SCRIPTS[module_name]
    _parse(module_name, required)  # the script's minimal command line parses
    capsys.readouterr()
    cases = [(bad, named)] + ([(refused, refused_named)] if refused else [])
    for argv, flag in cases:
        with pytest.raises(SystemExit) as e:
            _parse(module_name, required + argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert flag in err, f"{module_name} {argv}: {err}"


def test_plan_distill_requires_its_mesh():
    with pytest.raises(SystemExit) as e:
        _parse("eval.plan_distill", ["--devices", "4"])
    assert e.value.code == 2


def test_flags_reach_the_scripts():
    from eval import bench_backbone, bench_data, bench_env, bench_pipeline, flops_table, plan_distill

    env = bench_env.parse_args(["--sizes", "1", "64", "--numpy_steps", "7"])
    assert env.sizes == (1, 64) and env.numpy_steps == 7 and env.steps == 1000
    assert bench_env.parse_args(["--quality_source", "replay", "--energy_scope", "system"]).quality_source == "replay"
    for bad in (["--quality_source", "prompt"], ["--energy_scope", "es"]):
        with pytest.raises(SystemExit):
            bench_env.parse_args(bad)
    quick = bench_env.parse_args(["--quick", "--steps", "5000"])
    assert (quick.steps, quick.repeats, quick.numpy_steps, quick.gym_steps) == (100, 1, 10, 200)  # --quick wins
    args, settings = bench_backbone.parse_args(["--quick", "--tome_side", "8", "--matmul_precision", "highest"])
    assert args.out == "" and settings.tome_side == 8 and settings.tome_channels == 64 and settings.repeats == 3
    assert settings.matmul_precision == "highest"
    assert bench_backbone.parse_args([])[0].out == "docs/bench_backbone.md"
    assert not bench_data.parse_args(["--no_time_step"]).time_step
    p = bench_pipeline.parse_args(["--no_sd15_bf16", "--sd15_repeats", "2"])
    assert p.sd15 and not p.sd15_bf16 and p.sd15_repeats == 2
    assert not flops_table.parse_args(["--no_torch"]).torch
    plan = plan_distill.parse_args(["--model", "sd15", "--devices", "8", "--rollout_remat", "--no_flops",
                                    "--grad_accum", "2", "--batch_per_device", "4", "--params", "fsdp"])
    assert plan.rollout_remat and not plan.flops and plan.grad_accum == 2 and plan.params == "fsdp"
    assert plan_distill.distill_config(plan).student.batch_size == 32  # 4 per device x 8 data-axis devices


def test_bench_cvpo_device_is_checked_before_any_work(capsys):
    """``--device`` other than cpu/gpu, and gpu where jax has no GPU backend, exit 2 naming it."""
    import jax

    from eval import bench_cvpo

    assert bench_cvpo.parse_args(["--device", "cpu"]).device == "cpu"
    bad = [["--device", "tpu"]] + ([["--device", "gpu"]] if jax.default_backend() != "gpu" else [])
    for argv in bad:
        with pytest.raises(SystemExit) as e:
            bench_cvpo.parse_args(argv)
        assert e.value.code == 2
        assert "--device" in capsys.readouterr().err
