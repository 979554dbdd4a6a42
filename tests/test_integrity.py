"""Integrity of converted models, paths when writing, --force, leftovers and atomic writes,
environment failures, non-finite weights, verify --reference, and hashing each byte once.

Every reproduction of issue 12 in these areas is a test here: one line on stderr naming the
file, the key and what was expected, exit status 2, and nothing left behind."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import factories
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from statecast.checkpoints import atomic, layout, store
from statecast.checkpoints.layout import open_unified
from statecast.cli import main
from statecast.convert.pull import pull
from statecast.errors import StatecastError


def run_bad(args, expect: str, code: int = 2, env: dict | None = None) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    # progress lines ("... tracing") may come first; the error is one line
    err = "\n".join(line for line in result.stderr.strip().splitlines() if not line.startswith("... "))
    assert "Traceback" not in result.output
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert expect in err, err
    return err


def run_ok(args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def copy_model(pulled: Path, tmp_path: Path, name: str = "m") -> Path:
    d = tmp_path / name
    shutil.copytree(pulled, d)
    return d


def edit_meta(model: Path, fn) -> None:
    meta = json.loads((model / "statecast.json").read_text())
    fn(meta)
    (model / "statecast.json").write_text(json.dumps(meta))


def tensor_offset(path: Path, name: str) -> int:
    """Absolute offset of tensor ``name``'s first byte in a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return 8 + n + header[name]["data_offsets"][0]


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- tampering


def test_flipped_byte_is_caught_by_verify_inspect_check_and_export(pulled_hf, tmp_path):
    m = copy_model(pulled_hf, tmp_path)
    weights = m / "model.safetensors"
    flip_byte(weights, tensor_offset(weights, "layers.1.mlp.down.weight") + 5)
    expect = f"{weights}: tensor 'layers.1.mlp.down.weight' does not match its sha256 in {m / 'statecast.json'}"
    err = run_bad(["verify", m, "--device", "cpu"], expect)
    assert "modified after conversion" in err
    assert not (m / "parity.json").exists()
    run_bad(["export", m, "--format", "hf", "--out", tmp_path / "hf"], expect)
    assert not (tmp_path / "hf").exists()
    from statecast.convert.describe import check_unified, inspect_path

    with pytest.raises(StatecastError, match="does not match its sha256"):
        check_unified(m)
    with pytest.raises(StatecastError, match="does not match its sha256"):
        inspect_path(m, check=True)
    assert inspect_path(pulled_hf, check=True)["integrity"] == "ok"


def test_zeroed_manifest_hash_is_caught(pulled_hf, tmp_path):
    m = copy_model(pulled_hf, tmp_path)
    edit_meta(m, lambda meta: meta["tensors"]["embed.weight"].__setitem__("sha256", "0" * 64))
    run_bad(["verify", m, "--device", "cpu"], "tensor 'embed.weight' does not match its sha256")
    edit_meta(m, lambda meta: meta["tensors"]["embed.weight"].__setitem__("sha256", ""))
    run_bad(["generate", m, "--prompt-ids", "1,2"],
            f"{m / 'statecast.json'}: tensors['embed.weight'].sha256 must be 64 lowercase hex digits, got ''")


def test_changed_shape_and_deleted_entry_are_caught_on_open(pulled_hf, tmp_path):
    m = copy_model(pulled_hf, tmp_path)
    edit_meta(m, lambda meta: meta["tensors"]["final_norm.weight"].__setitem__("shape", [33]))
    run_bad(["generate", m, "--prompt-ids", "1,2"],
            f"{m / 'model.safetensors'}: tensor 'final_norm.weight' is [32] float32 in the file, [33] float32 in "
            f"{m / 'statecast.json'}")
    m2 = copy_model(pulled_hf, tmp_path, "m2")
    edit_meta(m2, lambda meta: meta["tensors"].pop("lm_head.weight"))
    run_bad(["export", m2, "--format", "onnx", "--out", tmp_path / "o"],
            f"{m2 / 'model.safetensors'}: tensor 'lm_head.weight' is not in the manifest of {m2 / 'statecast.json'}")
    m3 = copy_model(pulled_hf, tmp_path, "m3")
    edit_meta(m3, lambda meta: meta["tensors"].__setitem__("extra.weight", {"shape": [2], "dtype": "float32",
                                                                           "sha256": "a" * 64}))
    run_bad(["inspect", m3], f"{m3 / 'statecast.json'}: tensor 'extra.weight' (of 1 missing) is in none of the weight files")
    assert not (tmp_path / "o").exists() and hidden(tmp_path) == []


def test_appended_bytes_change_the_file_size(pulled_hf, tmp_path):
    m = copy_model(pulled_hf, tmp_path)
    with open(m / "model.safetensors", "ab") as f:
        f.write(b"\0" * 16)
    run_bad(["generate", m, "--prompt-ids", "1"], str(m / "model.safetensors"))


def test_config_that_does_not_match_the_weights_is_refused_by_export(pulled_hf, tmp_path):
    """The issue's `export hf` writing a config of 3 layers beside weights of 2: the manifest is
    checked against the family's model for the recorded config."""
    m = copy_model(pulled_hf, tmp_path)

    def two_layers(meta):
        meta["config"]["n_layer"] = 2
        meta["config"]["layer_kinds"] = ["rwkv", "rwkv"]

    edit_meta(m, two_layers)
    run_bad(["export", m, "--format", "hf", "--out", tmp_path / "hf"],
            f"{m / 'statecast.json'}: the manifest has tensor 'layers.2.mixer_norm.weight', which the config "
            f"(n_layer 2, d_model 32")
    assert not (tmp_path / "hf").exists()
    from statecast.convert.describe import check_model

    m2 = copy_model(pulled_hf, tmp_path, "m2")
    edit_meta(m2, lambda meta: meta["config"].__setitem__("d_ffn", 64))
    with pytest.raises(StatecastError, match=r"tensor 'layers.0.mlp.up.weight' is \[128, 32\] in the manifest, the config"):
        check_model(open_unified(m2))


@pytest.mark.parametrize("content, expect", [
    (b"\xff\xfe{}", "not UTF-8 text (byte 0)"),
    (b"[1, 2]", "expected a JSON object, got a list"),
    (b"", "corrupt"),
    (b"[" * 100_000, "corrupt"),
])
def test_statecast_json_that_is_not_an_object(pulled_hf, tmp_path, content, expect):
    m = copy_model(pulled_hf, tmp_path)
    (m / "statecast.json").write_bytes(content)
    run_bad(["generate", m, "--prompt-ids", "1"], f"{m / 'statecast.json'}: {expect}" if expect != "corrupt" else expect)
    assert run_ok(["list", "--json"]) == "[]\n"  # not in the store; nothing else breaks


@pytest.mark.parametrize("edit, expect", [
    (lambda meta: meta.pop("tensors"), "missing key 'tensors'; expected the tensor manifest"),
    (lambda meta: meta.__setitem__("config", [1]), "'config' must be the unified config (an object), got a list"),
    (lambda meta: meta.__setitem__("weights", [3]), "'weights' must be a list of weight file names, got an entry that is an integer"),
    (lambda meta: meta.__setitem__("weights", []), "'weights' is empty"),
    (lambda meta: meta.__setitem__("n_params", "many"), "'n_params' must be the parameter count (an integer), got a string"),
    (lambda meta: meta["tensors"]["embed.weight"].__setitem__("dtype", "float8"), "tensors['embed.weight'].dtype must be one of"),
    (lambda meta: meta["tensors"]["embed.weight"].__setitem__("shape", ["206", 32]), "tensors['embed.weight'].shape must be a list of non-negative integers"),
])
def test_statecast_json_keys_of_the_wrong_type(pulled_hf, tmp_path, edit, expect):
    m = copy_model(pulled_hf, tmp_path)
    edit_meta(m, edit)
    run_bad(["inspect", m], f"{m / 'statecast.json'}: {expect}")


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize("fmt", ["hf", "onnx"])
def test_tokenizer_entry_cannot_make_export_write_outside_out(pulled_hf, tmp_path, fmt):
    m = copy_model(pulled_hf, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (m / "victim.txt").write_text("overwritten")
    edit_meta(m, lambda meta: meta.__setitem__("tokenizer", ["tokenizer.json", "../victim.txt"]))
    run_bad(["export", m, "--format", fmt, "--out", tmp_path / "out"],
            f"{m / 'statecast.json'}: 'tokenizer': '../victim.txt' leaves the checkpoint directory")
    assert victim.read_text() == "precious" and not (tmp_path / "out").exists()
    edit_meta(m, lambda meta: meta.__setitem__("tokenizer", [str(victim)]))
    run_bad(["export", m, "--format", fmt, "--out", tmp_path / "out"], "leaves the checkpoint directory")
    assert victim.read_text() == "precious" and hidden(tmp_path) == []


def test_tokenizer_symlink_out_of_the_model_is_refused(pulled_hf, tmp_path):
    m = copy_model(pulled_hf, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("key")
    (m / "tokenizer.json").unlink()
    (m / "tokenizer.json").symlink_to(secret)
    run_bad(["export", m, "--format", "hf", "--out", tmp_path / "out"], f"resolves to {secret}, outside")
    assert not (tmp_path / "out").exists()


def test_weight_path_outside_the_model_is_refused(pulled_hf, tmp_path):
    m = copy_model(pulled_hf, tmp_path)
    shutil.copy(m / "model.safetensors", tmp_path / "elsewhere.safetensors")
    edit_meta(m, lambda meta: meta.__setitem__("weights", ["../elsewhere.safetensors"]))
    run_bad(["generate", m, "--prompt-ids", "1"], "'weights': '../elsewhere.safetensors' leaves the checkpoint directory")


def test_pull_out_may_not_be_contain_or_sit_inside_the_source(hf_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    before = sorted(p.name for p in src.iterdir())
    run_bad(["pull", src, "--out", src, "--force"], f"output path {src} is the source {src}")
    run_bad(["pull", src, "--out", src / "sub"], f"output path {src / 'sub'} is inside the source {src}")
    run_bad(["pull", src, "--out", tmp_path, "--force"], f"output path {tmp_path} contains the source {src}")
    assert sorted(p.name for p in src.iterdir()) == before
    native = factories.native_rwkv4(tmp_path / "native")  # beside a lone file is fine; the file itself is not
    run_bad(["pull", native, "--out", native, "--force"], "is the source")
    assert pull(str(native), out=tmp_path / "native" / "converted", progress=False)["family"] == "rwkv"


def test_force_never_replaces_an_arbitrary_directory(hf_dir, tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "thesis.tex").write_text("years of work")
    run_bad(["pull", hf_dir, "--out", parent, "--force"],
            f"refusing to replace {parent} with --force: it is not a statecast output")
    assert (parent / "thesis.tex").read_text() == "years of work"
    assert hidden(tmp_path) == []
    # a statecast output is replaced; so is an HF export (its marker)
    out = tmp_path / "m"
    pull(str(hf_dir), out=out, progress=False)
    pull(str(hf_dir), out=out, progress=False, force=True)
    run_ok(["export", out, "--format", "hf", "--out", tmp_path / "hf"])
    assert (tmp_path / "hf" / atomic.EXPORT_MARKER).is_file()
    run_ok(["export", out, "--format", "hf", "--out", tmp_path / "hf", "--force"])
    run_bad(["export", out, "--format", "hf", "--out", out, "--force"], f"output path {out} is the source {out}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m", "parent"]


def test_failed_swap_puts_the_old_model_back(hf_dir, tmp_path, monkeypatch):
    out = tmp_path / "m"
    pull(str(hf_dir), out=out, progress=False)
    (out / "parity.json").write_text('{"passed": true}')
    before = (out / "statecast.json").read_bytes()
    monkeypatch.setattr(atomic, "_renameat2", lambda *a: False)  # no atomic exchange: move aside, then rename
    real = atomic._rename_noreplace

    def failing(src, dst):
        if Path(dst) == out:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        return real(src, dst)

    monkeypatch.setattr(atomic, "_rename_noreplace", failing)
    with pytest.raises(StatecastError, match=f"cannot write {out}: Input/output error"):
        pull(str(hf_dir), out=out, progress=False, force=True)
    assert (out / "statecast.json").read_bytes() == before and (out / "parity.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    monkeypatch.setattr(atomic, "_rename_noreplace", real)  # and without the failure, the fallback swap works
    pull(str(hf_dir), out=out, progress=False, force=True)
    assert not (out / "parity.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("what", ["file", "empty directory"])
def test_output_created_during_the_pull_is_left_alone(hf_dir, tmp_path, monkeypatch, what):
    import statecast.convert.pull as pull_mod

    out = tmp_path / "out"
    real = pull_mod.write_weights

    def racing(*args, **kwargs):
        out.mkdir()
        if what == "file":
            (out / "mine.txt").write_text("created meanwhile")
        return real(*args, **kwargs)

    monkeypatch.setattr(pull_mod, "write_weights", racing)
    with pytest.raises(StatecastError, match=f"output path {out} appeared while writing it; it was left as it is"):
        pull(str(hf_dir), out=out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == (["mine.txt"] if what == "file" else [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --------------------------------------------------------------------------- leftovers and atomic writes


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_leftovers_are_removed_by_the_next_run(hf_dir, tmp_path):
    pid = dead_pid()
    stale = [tmp_path / f".m.partial-{pid}-0-abc123", tmp_path / f".other.old-{pid}-12345-x_y"]
    for d in stale:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    stale_file = tmp_path / f".parity.json.tmp-{pid}-0-zz"
    stale_file.write_text("")
    live = tmp_path / f".m.partial-{store.owner_tag()}-live"  # ours: a run in progress
    live.mkdir()
    foreign = tmp_path / ".m.partial-xyz"  # not ours to judge (no owner in the name)
    foreign.mkdir()
    pull(str(hf_dir), out=tmp_path / "m", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, foreign.name, "m"])


def test_killed_run_leftover_is_cleaned_and_listed(tmp_path, monkeypatch):
    """A real kill -9 in the middle of writing leaves a partial directory; `convert list`
    (store.list_models) removes it and says how many it removed."""
    models = tmp_path / "store" / "models"
    monkeypatch.setenv("STATECAST_HOME", str(tmp_path / "store"))
    code = ("import os, signal, sys\n"
            "from statecast.checkpoints.atomic import atomic_directory\n"
            "with atomic_directory(sys.argv[1]) as tmp:\n"
            "    (tmp / 'model.safetensors').write_bytes(b'x' * 1000)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code, str(models / "victim")], capture_output=True)
    assert r.returncode == -9
    left = [p.name for p in models.iterdir()]
    assert len(left) == 1 and left[0].startswith(".victim.partial-")
    cleaned: list[str] = []
    assert store.list_models(cleaned=cleaned) == [] and cleaned == left
    assert list(models.iterdir()) == []


def test_concurrent_json_writers_and_readers(tmp_path):
    target = tmp_path / "parity.json"
    atomic.write_json_atomic(target, {"passed": True, "writer": -1})
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(i):
        try:
            for j in range(150):
                atomic.write_json_atomic(target, {"passed": True, "writer": i, "n": j, "pad": "x" * 2000})
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    def reader():
        while not stop.is_set():
            try:
                assert json.loads(target.read_text())["passed"] is True
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parity.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~atomic._umask())


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe", b"[]", b'{"passed": "yes"}'])
def test_unreadable_parity_json_does_not_break_list_or_inspect(pulled_hf, tmp_path, content):
    m = copy_model(pulled_hf, store.models_dir(), "broken")
    copy_model(pulled_hf, store.models_dir(), "fine")
    (m / "parity.json").write_bytes(content)
    listed = {x["name"]: x for x in store.list_models()}
    assert listed["broken"]["status"] == "parity.json unreadable" and listed["broken"]["verified"] is None
    assert listed["fine"]["status"] == "not verified"
    run_ok(["list"])
    assert "parity:    parity.json unreadable" in run_ok(["inspect", m])


def test_nan_metrics_in_parity_json_do_not_break_inspect(pulled_hf, tmp_path):
    m = copy_model(pulled_hf, tmp_path)
    (m / "parity.json").write_text('{"passed": false, "max_abs_diff": NaN, "nmse_db": null, "top1_agreement": null}')
    out = run_ok(["inspect", m])
    assert "parity:    FAIL (max |diff| nan, NMSE exact, top-1 n/a)" in out


def test_list_reports_an_unreadable_model(pulled_hf):
    m = copy_model(pulled_hf, store.models_dir(), "damaged")
    (m / "statecast.json").write_bytes(b"\xff")
    assert [x["status"] for x in store.list_models()] == ["statecast.json unreadable"]
    run_ok(["list"])


# --------------------------------------------------------------------------- environment failures


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "20m"):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    # the test machine (and CI on it) runs as root with tmpfs: a real full disk, not a mock
    assert r.returncode == 0, f"cannot mount a tmpfs here: {r.stderr.decode().strip()[:100]}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path, leave: int = 0) -> None:
    """Fill the file system of ``directory`` until ``leave`` bytes are free."""
    chunk = b"\0" * (1 << 20)
    with open(directory / "filler", "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
                if free <= leave:
                    break
                f.write(chunk[: max(4096, min(len(chunk), free - leave))])
                f.flush()


def test_disk_full_in_pull_export_and_verify(pulled_hf, hf_dir, tmp_path):
    with tmpfs(tmp_path / "small") as disk:
        m = copy_model(pulled_hf, disk)
        fill(disk, leave=32 * 1024)
        run_bad(["pull", hf_dir, "--out", disk / "out", "--quiet"], f"cannot write {disk / 'out'}: No space left on device")
        run_bad(["export", m, "--format", "hf", "--out", disk / "hf"], f"cannot write {disk / 'hf'}: No space left on device")
        run_bad(["export", m, "--format", "onnx", "--out", disk / "onnx"], f"cannot write {disk / 'onnx'}: No space left on device")
        (disk / "filler").write_bytes(b"")  # room for the model's own checks, then none for parity.json
        fill(disk, leave=0)
        run_bad(["verify", m, "--device", "cpu"], f"cannot write {m / 'parity.json'}: No space left on device")
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "m"]
        assert sorted(p.name for p in m.iterdir()) == sorted(p.name for p in pulled_hf.iterdir())


def test_read_only_store(pulled_hf, hf_dir, tmp_path):
    with tmpfs(tmp_path / "ro", "5m") as disk:
        m = copy_model(pulled_hf, disk)
        remount = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True)
        assert remount.returncode == 0, remount.stderr.decode()
        run_bad(["verify", m, "--device", "cpu"], f"cannot write {m / 'parity.json'}: Read-only file system")
        run_bad(["pull", hf_dir, "--out", disk / "out"], f"cannot write {disk / 'out'}: Read-only file system")
        run_bad(["export", m, "--format", "hf"], f"cannot write {m / 'hf'}: Read-only file system")


@pytest.mark.parametrize("where", ["_pwrite_all", "_write_all"])  # a tensor (in a worker), statecast.json
def test_permission_denied_while_writing(hf_dir, tmp_path, monkeypatch, where):
    module = layout if where == "_pwrite_all" else atomic
    real = getattr(module, where)
    calls = {"n": 0}

    def denied(*args):
        calls["n"] += 1
        if calls["n"] == (3 if where == "_pwrite_all" else 1):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real(*args)

    monkeypatch.setattr(module, where, denied)
    out = tmp_path / "out"
    expect = out if where == "_pwrite_all" else out / "statecast.json"
    with pytest.raises(StatecastError, match=f"cannot write {expect}: Permission denied"):
        pull(str(hf_dir), out=out, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_out_under_a_regular_file_or_in_proc(hf_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    run_bad(["pull", hf_dir, "--out", tmp_path / "afile" / "sub" / "m"],
            f"cannot create {tmp_path / 'afile' / 'sub' / 'm'}: {tmp_path / 'afile'} is not a directory")
    run_bad(["pull", hf_dir, "--out", "/proc/statecast-test", "--quiet"], "cannot write /proc/statecast-test: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


# --------------------------------------------------------------------------- non-finite and non-float weights


def with_weights(src: Path, tmp_path: Path, fn, name: str = "src") -> Path:
    d = tmp_path / name
    shutil.copytree(src, d)
    f = next(d.glob("*.safetensors"))
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weight_is_refused(hf_dir, tmp_path, value):
    key = "rwkv.blocks.1.attention.key.weight"
    d = with_weights(hf_dir, tmp_path, lambda sd: sd[key].__setitem__((3, 4), value))
    run_bad(["pull", d, "--out", tmp_path / "out", "--quiet"],
            f"{d / 'model.safetensors'}: tensor '{key}' holds NaN or Inf values; expected finite weights "
            f"(--allow-nonfinite converts it anyway)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    info = pull(str(d), out=tmp_path / "out", progress=False, allow_nonfinite=True)
    assert info["n_params"] > 0


def test_nonfinite_in_bfloat16_and_bin_and_cast_overflow(hf_dir, tmp_path):
    key = "rwkv.blocks.0.feed_forward.value.weight"

    def bf16_nan(sd):
        for k in sd:
            sd[k] = sd[k].to(torch.bfloat16)
        sd[key][0, 0] = float("nan")

    d = with_weights(hf_dir, tmp_path, bf16_nan, "bf16")
    with pytest.raises(StatecastError, match=f"tensor '{key}' holds NaN or Inf values"):
        pull(str(d), out=tmp_path / "o1", progress=False)
    b = tmp_path / "bin"  # a pickle source: checked as each tensor is produced
    shutil.copytree(hf_dir, b)
    sd = load_file(b / "model.safetensors")
    sd[key][1, 1] = float("inf")
    torch.save(sd, b / "pytorch_model.bin")
    (b / "model.safetensors").unlink()
    with pytest.raises(StatecastError, match=f"{b / 'pytorch_model.bin'}: tensor '{key}' holds NaN or Inf values"):
        pull(str(b), out=tmp_path / "o2", progress=False)
    big = with_weights(hf_dir, tmp_path, lambda sd: sd[key].__setitem__((0, 0), 1e6), "big")
    with pytest.raises(StatecastError, match=f"tensor '{key}' overflows float16"):
        pull(str(big), out=tmp_path / "o3", progress=False, dtype="float16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "big", "bin"]


def test_integer_tensor_for_a_float_weight_is_refused(hf_dir, tmp_path):
    key = "rwkv.blocks.2.attention.output.weight"
    d = with_weights(hf_dir, tmp_path, lambda sd: sd.__setitem__(key, sd[key].to(torch.int32)))
    err = run_bad(["pull", d, "--out", tmp_path / "out"], key)
    assert "int32" in err and "float" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# --------------------------------------------------------------------------- verify --reference


@pytest.fixture()
def pulled_native(native_pth, tmp_path):
    src = tmp_path / "native"
    shutil.copytree(native_pth.parent, src)
    return src / native_pth.name, Path(pull(str(src / native_pth.name), out=tmp_path / "m", progress=False)["path"])


def evil_copy(pth: Path, out: Path, marker: Path) -> Path:
    sd = torch.load(pth, weights_only=True)
    sd["payload"] = factories.CreatesFileWhenUnpickled(str(marker))
    out.mkdir()
    torch.save(sd, out / pth.name)
    return out / pth.name


def test_malicious_reference_is_refused_and_never_run(pulled_native, tmp_path):
    pth, model = pulled_native
    marker = tmp_path / "pwned"
    evil = evil_copy(pth, tmp_path / "evil", marker)
    env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    run_bad(["verify", model, "--device", "cpu", "--reference", evil],
            f"--reference {evil} is not the checkpoint {model} was converted from", env=env)
    assert not marker.exists() and not (model / "parity.json").exists()
    run_bad(["verify", model, "--device", "cpu", "--reference", evil.parent], "is not the checkpoint", env=env)
    assert not marker.exists()
    # a reference with other file names is refused too, before anything loads it
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(evil, other / "a.pth")
    shutil.copy(evil, other / "b.pth")
    run_bad(["verify", model, "--device", "cpu", "--reference", other], "several .pth files", env=env)
    assert not marker.exists()


def test_rwkv_package_reference_reads_through_the_restricted_reader(pulled_native, tmp_path, monkeypatch):
    """The second line of defence: even handed a malicious file directly, the rwkv package's
    reference refuses it in one line, with the variable that lifts weights_only set."""
    from statecast.families.rwkv import RwkvPackageReference

    pth, _ = pulled_native
    marker = tmp_path / "pwned"
    evil = evil_copy(pth, tmp_path / "evil", marker)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(StatecastError, match=f"refusing to load {evil}: it is not a plain tensor checkpoint"):
        RwkvPackageReference(evil, torch.device("cpu"))
    assert not marker.exists()
    seen = {}
    import rwkv.model

    real = rwkv.model.RWKV

    def spy(*args, **kwargs):
        seen.update({k: os.environ.get(k) for k in ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_WEIGHTS_ONLY_LOAD")})
        return real(*args, **kwargs)

    monkeypatch.setattr(rwkv.model, "RWKV", spy)
    RwkvPackageReference(pth, torch.device("cpu"))
    assert seen == {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": None, "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1" and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_reference_that_differs_from_the_converted_file_is_refused(pulled_hf, hf_dir, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(hf_dir, moved)
    m = copy_model(pulled_hf, tmp_path)
    flip_byte(moved / "model.safetensors", tensor_offset(moved / "model.safetensors", "rwkv.ln_out.weight"))
    run_bad(["verify", m, "--device", "cpu", "--reference", moved],
            f"the original file {moved / 'model.safetensors'} changed since conversion")


# --------------------------------------------------------------------------- provenance: each byte hashed once


def test_source_digest_is_the_documented_tree(pulled_hf, hf_dir):
    """``sha256-tree:`` = sha256 over (length, sha256) of the header and each tensor's bytes in
    file order, computed here independently of statecast's code."""
    raw = (hf_dir / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    segments = [raw[: 8 + n]] + [raw[8 + n + b : 8 + n + e] for b, e in spans]
    assert b"".join(segments) == raw
    h = hashlib.sha256(b"statecast sha256-tree/1\n")
    for s in segments:
        h.update(len(s).to_bytes(8, "little") + hashlib.sha256(s).digest())
    files = open_unified(pulled_hf).source["files"]
    assert files["model.safetensors"] == "sha256-tree:" + h.hexdigest() == layout.file_digest(hf_dir / "model.safetensors")
    assert files["tokenizer.json"] == hashlib.sha256((hf_dir / "tokenizer.json").read_bytes()).hexdigest()


def test_pull_hashes_each_source_byte_once_and_copies_unchanged_tensors(hf_dir, tmp_path, monkeypatch):
    hashed = []
    real_range = layout.hash_range

    def counting(fd, begin, end, *rest):
        hashed.append(end - begin)
        return real_range(fd, begin, end, *rest)

    monkeypatch.setattr(layout, "hash_range", counting)
    monkeypatch.setattr(layout, "_sha256_bytes", lambda buf: pytest.fail("an output tensor was hashed again"))
    info = pull(str(hf_dir), out=tmp_path / "m", progress=False)
    sources = [f for f in hf_dir.iterdir() if f.is_file() and f.name != "config.json"]
    assert sum(hashed) == sum(f.stat().st_size for f in sources)
    um = open_unified(info["path"])
    layout.verify_tensor_hashes(um)  # the manifest hashes are those of the written bytes
    ours, theirs = load_file(um.path / "model.safetensors"), load_file(hf_dir / "model.safetensors")
    assert torch.equal(ours["layers.0.time_mix.mix_k"], theirs["rwkv.blocks.0.attention.time_mix_key"].reshape(-1))
