"""The CLI's options come from `Hyperparameters` (one set for `tune` and `pipeline`), `--config FILE`
merges under them, and its numbers say what they are. No stack: these run the real Typer commands' option
parsing and the flows' rendering; tests/stack/test_cli.py runs the same commands against the real stack."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer.main

from events.payloads import ErrorInfo, Hyperparameters, TrainMetrics, TuningProgress
from infra.cli import app
from infra.flows import FlowError, failure_hints, job_losses, progress_fields, summary_line
from infra.options import build_hyperparameters, option_name


def _options(command: str) -> dict[str, object]:
    cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    return {opt: p for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}


@pytest.mark.parametrize("command", ["tune", "pipeline"])
def test_every_hyperparameter_is_an_option_of_both_commands(command: str) -> None:
    opts = _options(command)
    for field, info in Hyperparameters.model_fields.items():
        assert option_name(field) in opts, f"{command} lacks {option_name(field)}"
        help_text = opts[option_name(field)].help or ""  # type: ignore[attr-defined]
        if info.description:
            assert info.description in help_text
    assert "--no-packing" in opts and "--config" in opts
    assert "[>0, ≤1]" in (opts["--learning-rate"].help or "")  # type: ignore[attr-defined]  # the constraints


def test_both_commands_take_the_same_hyperparameter_options() -> None:
    def hp(command: str) -> set[str]:
        return {o for o, p in _options(command).items() if getattr(p, "rich_help_panel", None) == "Hyperparameters"}

    assert hp("tune") == hp("pipeline") and len(hp("tune")) > len(Hyperparameters.model_fields)


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".toml"])
def test_a_config_file_is_merged_under_the_options_given(tmp_path: Path, suffix: str) -> None:
    values = {"learning_rate": 0.001, "lora_r": 4, "target_modules": ["q_proj", "v_proj"], "lr_scheduler": "linear"}
    path = tmp_path / f"hp{suffix}"
    if suffix == ".yaml":
        path.write_text("learning_rate: 0.001\nlora_r: 4\ntarget_modules: [q_proj, v_proj]\nlr_scheduler: linear\n")
    elif suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        path.write_text('learning_rate = 0.001\nlora_r = 4\ntarget_modules = ["q_proj", "v_proj"]\n'
                        'lr_scheduler = "linear"\n')
    hp = build_hyperparameters(path, {"lora_r": 16, "target_modules": "all-linear", "epochs": None})
    assert hp.learning_rate == 0.001 and hp.lr_scheduler == "linear"  # from the file
    assert hp.lora_r == 16 and hp.target_modules == "all-linear"  # the command line wins
    assert hp.batch_size == Hyperparameters().batch_size  # neither: the model's default


def test_bad_values_are_one_line_that_names_the_field_and_where_it_came_from(tmp_path: Path) -> None:
    path = tmp_path / "hp.yaml"
    path.write_text("learning_rate: -1\nlorar: 3\n")
    with pytest.raises(FlowError) as e:
        build_hyperparameters(path, {"batch_size": 0})
    msg = e.value.message
    assert "\n" not in msg and e.value.code == 1
    assert "learning_rate (in hp.yaml): Input should be greater than 0" in msg
    assert "lorar (in hp.yaml): not a hyperparameter" in msg
    assert "batch_size: Input should be greater than or equal to 1 (got 0)" in msg
    path.write_text("learning_rate: [1, 2\n")
    with pytest.raises(FlowError, match=r"hp.yaml is not valid YAML"):
        build_hyperparameters(path, {})
    path.write_text("- 1\n- 2\n")
    with pytest.raises(FlowError, match="expected a mapping"):
        build_hyperparameters(path, {})


def test_numbers_say_what_they_are() -> None:
    ev = TuningProgress(job_id="ftjob-abc", status="running", step=3, max_steps=10, loss=2.5, tokens_per_s=99.4)
    assert progress_fields(ev, 3.25) == {"status": "running", "steps": "3/10", "loss": "2.500", "eval_loss": "3.250",
                                         "tps": "99"}
    waiting = TuningProgress(job_id="ftjob-abc", status="waiting", step=0, max_steps=0)
    assert progress_fields(waiting, None)["steps"] == "-" and progress_fields(waiting, None)["loss"] == "-"
    m = TrainMetrics(steps=12, epochs=1, train_loss=0.5, eval_loss=1.25, first_loss=2.75, tokens=100,
                     tokens_per_s=50, duration_s=2)
    line = summary_line("ftjob-abc", m, "jobs/ftjob-abc/adapter")
    assert "loss 2.750 (first step) → loss(avg10) 0.500, eval_loss 1.250" in line
    running = SimpleNamespace(metrics=None, loss=1.5, eval_loss=None, loss_history=[])
    assert job_losses(running) == {"loss": "1.500", "loss(avg10)": "-", "eval_loss": "-"}
    done = SimpleNamespace(metrics={"train_loss": 0.5}, loss=0.5, eval_loss=1.25,
                           loss_history=[{"step": 11, "loss": 0.75}, {"step": 12, "loss": 0.25, "eval_loss": None},
                                         {"step": 12, "loss": None, "eval_loss": 1.25}])
    assert job_losses(done) == {"loss": "0.250", "loss(avg10)": "0.500", "eval_loss": "1.250"}


def test_a_failure_names_the_commands_that_show_more() -> None:
    assert failure_hints(ErrorInfo(code="x", message="y"), "codetune job show J") == ["codetune job show J"]
    assert failure_hints(ErrorInfo(code="x", message="y", dead_letter_seq=7), "codetune job show J") == [
        "codetune job show J", "codetune dlq show 7"]


def test_the_flows_never_import_the_cli() -> None:
    """pipeline, demo and the flows are used by the CLI, not the other way round (no import cycle)."""
    import subprocess
    import sys

    code = ("import sys; import infra.flows, infra.options, infra.pipeline, infra.demo; "
            "assert 'infra.cli' not in sys.modules, 'infra.cli imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("loud", [False, True])
def test_a_stage_error_is_one_line_unless_verbose(loud: bool) -> None:
    """What FastStream logs through the in-process stages' logger (e.g. a retried fetch timeout)."""
    import subprocess
    import sys

    code = (f"from infra import console; console.configure({loud!r}); lg = console.stage_logger()\n"
            "try:\n    raise TimeoutError('fetch')\nexcept TimeoutError as e:\n"
            "    lg.error('Task-84 raised an exception, retrying...\\nIf this behavior causes issues', exc_info=e)\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    if loud:
        assert "Traceback" in err and "If this behavior" in err
    else:
        assert err.strip().splitlines() == ["ERROR codetune.stages: Task-84 raised an exception, retrying..."]
