"""The command line never shows a traceback by default: click's usage errors, generate's
arguments, untranslated OSErrors and unexpected exceptions are each one line on stderr with
exit status 2 (Ctrl-C: 130), and `--debug` / STATECAST_DEBUG=1 shows the traceback."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import factories
import numpy as np
import pytest
from click.testing import CliRunner

from statecast import cli as cli_module
from statecast.cli import main
from statecast.errors import StatecastError
from statecast.runtime import text


def run_bad(args, expect: str, code: int = 2, env: dict | None = None) -> str:
    r = CliRunner().invoke(main, args, env=env)
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    err = r.stderr.strip()
    assert "Traceback" not in r.output
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert expect in err, err
    return err


def run_cli(args: list, env: dict | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    """The real entry point in a subprocess (``code``: Python run before ``main()``, to inject a fault)."""
    prog = (code or "") + "\nfrom statecast.cli import main\nmain(prog_name='convert')\n"
    return subprocess.run([sys.executable, "-c", prog, *args], capture_output=True, timeout=300,
                          env={**os.environ, **(env or {})})


def one_line(r: subprocess.CompletedProcess, code: int = 2) -> str:
    err = r.stderr.decode()
    assert r.returncode == code, (r.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# --------------------------------------------------------------------------- click's usage errors


@pytest.mark.parametrize("args, expect", [
    (["frob"], "No such command 'frob' (see 'main --help')"),
    (["pull"], "Missing argument 'SOURCE' (see 'main pull --help')"),
    (["pull", "x", "--frob"], "No such option '--frob'"),
    (["list", "--jsn"], "No such option '--jsn'. Did you mean '--json'?"),
    (["pull", "x", "--dtype", "int3"], "Invalid value for '--dtype': 'int3' is not one of 'float32', 'float16', 'bfloat16'"),
    (["generate", "x", "--max-new-tokens", "0"], "Invalid value for '--max-new-tokens'"),
    (["generate", "x", "--runtime", "tpu"], "Invalid value for '--runtime'"),
    (["--frob", "list"], "No such option '--frob' (see 'main --help')"),
])
def test_usage_errors_are_one_line(args, expect):
    run_bad(args, expect)


def test_usage_error_in_the_real_program():
    err = one_line(run_cli(["pull", "x", "--frob"]))
    assert err == "error: No such option '--frob'. Did you mean '--force'? (see 'convert pull --help')"


def test_help_still_works():
    for args in (["--help"], ["pull", "--help"], ["generate", "-h"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0 and r.output.startswith("Usage: "), r.output
    assert "--debug" in CliRunner().invoke(main, ["--help"]).output
    r = CliRunner().invoke(main, [])  # a bare command shows the help, as before
    assert "Usage: " in r.output and "Commands:" in r.output


# --------------------------------------------------------------------------- the safety net


def boom(*args, **kwargs):
    raise RuntimeError("boom\nsecond line")


def test_unexpected_exception_is_one_line(monkeypatch):
    monkeypatch.setattr("statecast.checkpoints.store.list_models", boom)
    err = run_bad(["list"], "")
    assert err == "error: list failed unexpectedly: RuntimeError: boom (run with --debug for the traceback)"


def test_unexpected_exception_outside_a_command_body(monkeypatch):
    """Raised while click converts an option (the registry is read then): the same net catches it."""
    family = next(p for p in main.commands["demo"].params if p.name == "families")
    monkeypatch.setattr(family.type, "_read", boom)
    err = run_bad(["demo", "--family", "rwkv"], "")
    assert err == "error: demo failed unexpectedly: RuntimeError: boom (run with --debug for the traceback)"


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setattr("statecast.checkpoints.store.list_models", boom)
    r = CliRunner().invoke(main, ["--debug", "list"])
    assert isinstance(r.exception, RuntimeError) and r.exit_code == 1
    r = CliRunner().invoke(main, ["list"], env={"STATECAST_DEBUG": "1"})
    assert isinstance(r.exception, RuntimeError)
    r = CliRunner().invoke(main, ["list"], env={"STATECAST_DEBUG": "0"})
    assert r.exit_code == 2 and r.exception.__class__ is SystemExit


INJECT = "import statecast.checkpoints.store as s\ndef f(*a, **k): raise RuntimeError('boom')\ns.list_models = f\n"


def test_debug_in_the_real_program():
    err = one_line(run_cli(["list"], code=INJECT))
    assert err == "error: list failed unexpectedly: RuntimeError: boom (run with --debug for the traceback)"
    for args, env in ((["--debug", "list"], {}), (["list"], {"STATECAST_DEBUG": "1"})):
        r = run_cli(args, env=env, code=INJECT)
        stderr = r.stderr.decode()
        assert r.returncode == 1 and "Traceback (most recent call last)" in stderr and "RuntimeError: boom" in stderr
        assert "in list_" in stderr  # the frames down to the command
    # a StatecastError under --debug: its traceback, then the usual line and status
    r = run_cli(["--debug", "inspect", "/nonexistent/model"])
    stderr = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" in stderr and stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("exc, expect", [
    (OSError(errno.ENOSPC, "No space left on device", "/store/models/x/model.safetensors"),
     "error: list: No space left on device: /store/models/x/model.safetensors"),
    (PermissionError(errno.EACCES, "Permission denied", "/store/models"), "error: list: Permission denied: /store/models"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), "error: list: Invalid cross-device link: /a -> /b"),
    (OSError(errno.EIO, "Input/output error"), "error: list: Input/output error"),
])
def test_untranslated_oserror_names_the_path(monkeypatch, exc, expect):
    def raise_it(*a, **k):
        raise exc

    monkeypatch.setattr("statecast.checkpoints.store.list_models", raise_it)
    assert run_bad(["list"], "") == expect


def test_keyboard_interrupt_is_130(monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("statecast.checkpoints.store.list_models", interrupt)
    r = CliRunner().invoke(main, ["list"])
    assert r.exit_code == 130 and r.stderr.strip() == "interrupted"


def test_statecast_errors_keep_their_status(monkeypatch):
    from statecast.errors import ParityFailed

    def fail(*a, **k):
        raise ParityFailed("parity FAILED for x")

    monkeypatch.setattr("statecast.checkpoints.store.list_models", fail)
    assert run_bad(["list"], "", code=1) == "error: parity FAILED for x"


# --------------------------------------------------------------------------- generate's arguments


@pytest.mark.parametrize("args, expect", [
    (["--temperature", "nan"], "Invalid value for '--temperature': 'nan' is not a finite number"),
    (["--temperature", "inf"], "Invalid value for '--temperature': 'inf' is not a finite number"),
    (["--temperature", "0"], "Invalid value for '--temperature'"),
    (["--top-p", "nan"], "Invalid value for '--top-p': 'nan' is not a finite number"),
    (["--top-p", "1.5"], "Invalid value for '--top-p'"),
    (["--seed", str(2**70)], f"Invalid value for '--seed': {2**70} is not in the range 0<=x<=9223372036854775807"),
    (["--seed", str(2**63)], "Invalid value for '--seed'"),
    (["--seed", "-1", "--runtime", "onnx"], "Invalid value for '--seed': -1 is not in the range"),
    (["--seed", "-1"], "Invalid value for '--seed': -1 is not in the range"),
])
def test_sampling_arguments_are_checked_before_anything(args, expect, tmp_path):
    # the model path does not exist: the arguments are refused first
    run_bad(["generate", str(tmp_path / "none"), "--prompt-ids", "1", *args], expect)


def test_one_seed_rule_for_both_runtimes():
    assert cli_module.MAX_SEED == text.MAX_SEED == 2**63 - 1
    logits = np.linspace(0, 1, 7)
    calls = dict(start=lambda ids: logits, step=lambda tok: logits, prompt_ids=[1], max_new_tokens=3, greedy=False)
    assert len(text.decode(**calls, seed=text.MAX_SEED)) == 3
    assert len(text.decode(**calls, seed=0)) == 3
    for bad in (-1, 2**63, 2**70, 1.5, "3", True):
        with pytest.raises(StatecastError, match="--seed must be an integer with 0 <= seed < 2\\*\\*63"):
            text.decode(**calls, seed=bad)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(StatecastError, match="--temperature must be a finite number"):
            text.decode(**calls, temperature=bad)
    for bad in (float("nan"), 0.0, 1.01):
        with pytest.raises(StatecastError, match="--top-p must be a number in \\(0, 1\\]"):
            text.decode(**calls, top_p=bad)


def test_check_positions():
    text.check_positions(10, 247, 256, "m")  # positions 0..255
    text.check_positions(10, 10_000, None, "m")
    with pytest.raises(StatecastError, match="needs 257 positions but m has a learned position table of 256 "
                                             "\\(max_positions\\): use --max-new-tokens 247 or less"):
        text.check_positions(10, 248, 256, "m")
    with pytest.raises(StatecastError, match="the prompt has 300 tokens but m has a learned position table of 256"):
        text.check_positions(300, 1, 256, "m")


def test_non_utf8_prompt(pulled_hf):
    err = run_bad(["generate", str(pulled_hf), "--prompt", "ab\udcff\udcfe"], "--prompt is not valid UTF-8 text")
    assert err == ("error: --prompt is not valid UTF-8 text (byte 0xff at position 2); "
                   "pass UTF-8 text or token ids with --prompt-ids")
    with pytest.raises(StatecastError, match="not valid UTF-8"):
        text.prompt_ids_of(None, "\udcff", None, 10, "m")


def test_non_utf8_prompt_in_the_real_program(pulled_hf):
    r = run_cli(["generate", str(pulled_hf), "--prompt", b"caf\xe9"])  # Latin-1 bytes as an argument
    assert one_line(r) == ("error: --prompt is not valid UTF-8 text (byte 0xe9 at position 3); "
                           "pass UTF-8 text or token ids with --prompt-ids")
    assert r.stdout == b""


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny GPT-2 (learned position table of 256), pulled and exported to ONNX."""
    root = tmp_path_factory.mktemp("gpt2")
    src = factories.hf_transformer(root / "src", "gpt2", seed=5)
    r = CliRunner().invoke(main, ["pull", str(src), "--out", str(root / "unified"), "--quiet"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["export", str(root / "unified"), "--format", "onnx", "--json"])
    assert r.exit_code == 0, r.output
    return root / "unified"


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_generating_past_the_position_table_is_refused_before_any_output(gpt2, runtime):
    assert json.loads((gpt2 / "statecast.json").read_text())["config"]["max_positions"] == 256
    ids = ",".join(str(i) for i in range(1, 11))
    r = CliRunner().invoke(main, ["generate", str(gpt2), "--prompt-ids", ids, "--max-new-tokens", "248",
                                  "--runtime", runtime])
    assert r.exit_code == 2 and r.stdout == "", r.output
    assert r.stderr.strip() == (f"error: the prompt (10 tokens) plus --max-new-tokens 248 needs 257 positions but "
                                f"{gpt2 / 'onnx' if runtime == 'onnx' else gpt2} has a learned position table of 256 "
                                "(max_positions): use --max-new-tokens 247 or less")
    # with a text prompt nothing is echoed either
    r = CliRunner().invoke(main, ["generate", str(gpt2), "--prompt", "hello", "--max-new-tokens", "1000",
                                  "--runtime", runtime])
    assert r.exit_code == 2 and r.stdout == "" and "learned position table of 256" in r.stderr
    # exactly filling the table works
    r = CliRunner().invoke(main, ["generate", str(gpt2), "--prompt-ids", ids, "--max-new-tokens", "247",
                                  "--runtime", runtime, "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["new_ids"]) == 247


def test_text_prompt_is_still_echoed(gpt2):
    r = CliRunner().invoke(main, ["generate", str(gpt2), "--prompt", "hello", "--max-new-tokens", "3"])
    assert r.exit_code == 0 and r.stdout.startswith("hello") and r.stdout.endswith("\n")


# --------------------------------------------------------------------------- --out where nothing can be written


@pytest.mark.parametrize("where", ["file", "proc"])
def test_out_where_nothing_can_be_written(hf_dir, tmp_path, where):
    (tmp_path / "afile").write_text("not a directory")
    out = tmp_path / "afile" / "model" if where == "file" else Path("/proc") / f"statecast-{os.getpid()}"
    run_bad(["pull", str(hf_dir), "--out", str(out), "--quiet"], str(out))
    assert (tmp_path / "afile").read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_export_out_where_nothing_can_be_written(pulled_hf, tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    run_bad(["export", str(pulled_hf), "--format", "hf", "--out", str(tmp_path / "afile" / "hf")], "afile")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
