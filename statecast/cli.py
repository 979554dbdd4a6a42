"""The ``convert`` (alias ``statecast``) command line. Thin: each command calls one library function.

Every failure is one line on stderr, ``error: ...``:

* a :class:`StatecastError` (anything the user can cause): its message, exit 2 (1 for a parity failure);
* click's usage errors (unknown option, missing argument, bad value): one line instead of click's
  usage block, exit 2 (``--help`` is unchanged);
* an ``OSError`` the library did not translate (disk full, permission denied): the path and the
  reason, exit 2;
* anything else (a bug): ``error: COMMAND failed unexpectedly: TYPE: MESSAGE (run with --debug for
  the traceback)``, exit 2. ``convert --debug COMMAND ...`` (or ``STATECAST_DEBUG=1``) shows the
  traceback instead;
* Ctrl-C: ``interrupted``, exit 130.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import traceback

import click

from . import __version__
from .errors import StatecastError

# One rule for both runtimes (statecast.runtime.text.MAX_SEED checks it in the library too).
MAX_SEED = 2**63 - 1
DEBUG_ENV = "STATECAST_DEBUG"


def _emit(obj, as_json: bool, human) -> None:
    if as_json:
        click.echo(json.dumps(obj, indent=2))
    else:
        human(obj)


def _debug() -> bool:
    """``--debug`` on the ``main`` group, or ``$STATECAST_DEBUG`` set to something true."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.find_root().params.get("debug"):
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def _fail(e: BaseException, command: str):
    """Report ``e`` (raised by ``command``) in one line and exit; re-raise it under ``--debug``
    when it is unexpected. Click's own exceptions and exits pass through."""
    if isinstance(e, (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit)):
        raise e
    if isinstance(e, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        sys.exit(130)
    if isinstance(e, StatecastError):
        if _debug():
            traceback.print_exception(e, file=sys.stderr)
        click.echo(f"error: {_one_line(e)}", err=True)
        sys.exit(e.exit_code)
    if isinstance(e, BrokenPipeError):  # `convert list | head -1`: the reader left, nothing to say
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so that flushing at exit stays quiet
        except OSError:
            pass
        sys.exit(1)
    if _debug():
        raise e
    if isinstance(e, OSError) and e.strerror:
        paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
        click.echo(f"error: {command}: {e.strerror}{': ' + paths if paths else ''}", err=True)
        sys.exit(2)
    first = (str(e).strip().splitlines() or [""])[0]
    click.echo(f"error: {command} failed unexpectedly: {type(e).__name__}{': ' + _one_line(first) if first else ''} "
               "(run with --debug for the traceback)", err=True)
    sys.exit(2)


def handle_errors(fn):
    """One line on stderr and an exit status (2 for bad input or an unexpected failure, 130 for
    Ctrl-C), never a traceback unless ``--debug``. See the module docstring."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - _fail re-raises what it does not handle
            ctx = click.get_current_context(silent=True)
            _fail(e, ctx.info_name if ctx is not None and ctx.info_name else fn.__name__)

    return wrapper


class OneLineUsageError(click.UsageError):
    """A click usage error shown as one line, ``error: MESSAGE (see 'COMMAND --help')``."""

    def __init__(self, original: click.UsageError):
        super().__init__(original.format_message(), original.ctx)

    def show(self, file=None) -> None:
        hint = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        message = _one_line(self.format_message())
        click.echo(f"error: {message.rstrip('.') if hint else message}{hint}", err=True)


class StatecastGroup(click.Group):
    """The ``main`` group: click's usage errors become one line, and an exception raised outside a
    command's body (while parsing its options, say) gets the same last-resort handling."""

    @staticmethod
    def _usage(e: click.UsageError):
        if isinstance(e, (click.exceptions.NoArgsIsHelpError, OneLineUsageError)):
            return e  # a bare `convert` prints the help, as before
        return OneLineUsageError(e)

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            raise self._usage(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            raise self._usage(e) from None
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as e:  # noqa: BLE001
            _fail(e, ctx.invoked_subcommand or ctx.info_name or "convert")
        except KeyboardInterrupt as e:
            _fail(e, ctx.invoked_subcommand or ctx.info_name or "convert")


class FiniteFloat(click.FloatRange):
    """``click.FloatRange`` that also refuses nan and inf (a nan passes every range comparison)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
force_option = click.option("--force", is_flag=True, help="Replace the output if it exists.")
device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
dtype_choice = click.Choice(["float32", "float16", "bfloat16"])


class RegistryChoice(click.Choice):
    """A choice among what the family registry lists, read when the option is first used
    (importing the registry imports torch; ``convert --help`` should not)."""

    def __init__(self, read):
        self._read = read
        super().__init__([])

    @property
    def choices(self):
        return self._read()

    @choices.setter
    def choices(self, value):  # click.Choice.__init__ assigns it
        pass


def _family_names() -> list[str]:
    from .families import FAMILIES

    return list(FAMILIES)


kernels_option = click.option(
    "--kernels", default="auto", show_default=True,
    help="Whole-sequence implementation: 'auto' runs the family's compiled C++ CPU kernel where it has one "
         "(Mamba's scan) and it builds here and passes its self-check (float32 on the CPU; built once, "
         "cached by torch), else the pure-PyTorch path, and says which ran; 'torch' is the pure path; "
         "'compiled' requires the kernel (an error where it cannot run).")


def dtype_option(help_text: str):
    return click.option("--dtype", type=dtype_choice, default=None, help=help_text)


def provider_option(help_text: str):
    """onnxruntime's execution provider; None when not given (the command says where it applies)."""
    return click.option("--provider", type=click.Choice(["cpu", "cuda"]), default=None, help=help_text)


@click.group(cls=StatecastGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="statecast")
@click.option("--debug", is_flag=True, envvar=DEBUG_ENV,
              help=f"Show the traceback of an unexpected error (also {DEBUG_ENV}=1). Goes before the command.")
def main(debug) -> None:
    """Convert sequence-model checkpoints to one unified layout, verify parity, export, generate."""


@main.command()
@click.argument("source")
@click.option("--revision", default=None, help="Hub branch, tag or commit (Hub sources only).")
@click.option("--out", type=click.Path(), default=None, help="Output directory (default: the local store).")
@dtype_option("Cast floating weights (default: keep the source dtype).")
@force_option
@click.option("--allow-nonfinite", is_flag=True, help="Accept NaN/Inf in floating weights (refused by default).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@json_option
@handle_errors
def pull(source, revision, out, dtype, force, allow_nonfinite, quiet, as_json):
    """Fetch SOURCE (Hub repo id, Hub-format dir or native checkpoint) and convert it."""
    import contextlib

    from .convert.pull import pull as do_pull

    progress = not quiet and not as_json
    if progress:
        hub_output = contextlib.nullcontext()
    else:  # no progress bars or warnings from huggingface_hub either
        from .checkpoints.hub import quiet as hub_output
        hub_output = hub_output()
    with hub_output:
        info = do_pull(source, revision=revision, out=out, dtype=dtype, force=force, progress=progress,
                       allow_nonfinite=allow_nonfinite)
    _emit(info, as_json, lambda i: click.echo(i["path"]))


@main.command()
@click.argument("path")
@device_option
@dtype_option("Run our model in this dtype (default: float32, or the dtype `pull --dtype` cast to; the reference runs in float32).")
@click.option("--reference", type=click.Path(), default=None, help="Original files, if they moved since conversion.")
@kernels_option
@click.option("--stream", is_flag=True,
              help="Layer-streamed verify for models larger than memory: one block of each model at a time "
                   "(greedy decoding and step-vs-parallel skipped unless --stream-decode).")
@click.option("--stream-decode", is_flag=True, help="With --stream: also greedy decoding and step-vs-parallel (slow).")
@click.option("--device-map", type=click.Choice(["auto"]), default=None,
              help="Place the reference with accelerate over the GPUs, then CPU, then disk (implies --stream).")
@click.option("--max-memory", default=None, help="With --device-map auto: per-device limits, e.g. 0=70GiB,cpu=100GiB.")
@json_option
@handle_errors
def verify(path, device, dtype, reference, kernels, stream, stream_decode, device_map, max_memory, as_json):
    """Compare the converted model at PATH with the original implementation; write parity.json/.md."""
    from .checkpoints.store import resolve
    from .parity.verify import render_markdown
    from .parity.verify import verify as do_verify

    if (stream_decode and not (stream or device_map)) or (max_memory and not device_map):
        raise StatecastError("--stream-decode goes with --stream, --max-memory with --device-map auto")
    limits = None
    if max_memory:
        from .parity.streamed import parse_max_memory

        limits = parse_max_memory(max_memory)
    report = do_verify(resolve(path), device=device, dtype=dtype, reference=reference, kernels=kernels, raise_on_fail=False,
                       stream=stream, device_map=device_map, max_memory=limits, decode=stream_decode,
                       progress=None if as_json else lambda m: click.echo(f"... {m}", err=True))
    _emit(report, as_json, lambda r: click.echo(render_markdown(r)))
    if not report["passed"]:
        click.echo(f"error: parity FAILED (see {report['model']}/parity.md)", err=True)
        sys.exit(1)


@main.command()
@click.argument("path")
@click.option("--format", "fmt", required=True, help="Target format: hf (Hugging Face, exact round trip) or onnx.")
@click.option("--dtype", default=None, help="ONNX only: fp32 (default), fp16 or int8 (dynamic quantization).")
@provider_option("ONNX only: onnxruntime provider of the parity check (default cpu).")
@click.option("--moe-op", default=None,
              help="ONNX only, mixture-of-experts models: standard (default: ONNX ops any runtime runs) or "
                   "com.microsoft (onnxruntime's contrib MoE op: reads only the chosen experts, slower on CPU).")
@click.option("--allow-parity-failure", is_flag=True, default=None,
              help="ONNX only: write the graph even when its onnxruntime check fails (the failure is recorded in its "
                   "parity.json); without it a failed check writes nothing and exits 1.")
@click.option("--out", type=click.Path(), default=None,
              help="Output directory (default: PATH/hf, PATH/onnx, PATH/onnx-fp16, PATH/onnx-int8).")
@force_option
@json_option
@handle_errors
def export(path, fmt, dtype, provider, moe_op, allow_parity_failure, out, force, as_json):
    """Write the unified model at PATH in another format (ONNX: checked in onnxruntime first)."""
    from .checkpoints.store import resolve
    from .export import export as do_export

    progress = None if as_json else (lambda m: click.echo(f"... {m}", err=True))
    info = do_export(resolve(path), fmt, out, force=force, dtype=dtype, provider=provider, moe_op=moe_op,
                     allow_parity_failure=allow_parity_failure, progress=progress)

    def human(i):
        from .export.onnx import parity_line

        click.echo(i["path"])
        if "parity" in i:  # ONNX: the check it passed, or failed and was written anyway
            p = i["parity"]
            verdict = "passed" if p["passed"] else "FAILED (written anyway: --allow-parity-failure)"
            click.echo(f"parity ({i['dtype']}, onnxruntime {p['provider']}): {verdict}, {parity_line(p)}", err=True)

    _emit(info, as_json, human)


@main.command()
@click.argument("path")
@click.option("--prompt", default=None, help="Text prompt (needs the model's tokenizer).")
@click.option("--prompt-ids", default=None, help="Comma-separated token ids, e.g. 1,2,3.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1))
@click.option("--greedy", is_flag=True, help="Argmax decoding (the default unless --temperature is given).")
@click.option("--temperature", type=FiniteFloat(0, min_open=True), default=None)
@click.option("--top-p", type=FiniteFloat(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=None,
              help="Sampling seed, 0 <= S < 2**63 (the same tokens in both runtimes).")
@dtype_option("Run in this dtype (default: the checkpoint's).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True)
@kernels_option
@click.option("--runtime", type=click.Choice(["torch", "onnx"]), default="torch", show_default=True,
              help="onnx: run PATH's ONNX export (PATH/onnx, or an export directory) with onnxruntime, without torch.")
@provider_option("--runtime onnx: onnxruntime provider (default cpu; cuda needs onnxruntime-gpu).")
@json_option
@handle_errors
def generate(path, prompt, prompt_ids, max_new_tokens, greedy, temperature, top_p, seed, dtype, device, kernels,
             runtime, provider, as_json):
    """Generate from PATH: prefill, then one step per token (text streams as it comes)."""
    from .runtime.text import check_prompt

    if greedy and temperature is not None:
        raise StatecastError("--greedy and --temperature exclude each other")
    check_prompt(prompt)  # before it is echoed: a non-UTF-8 argument is refused, not half-printed
    shown = []  # the prompt is echoed with the first new text, so that an error comes before any output

    def stream(text: str) -> None:
        if not shown and prompt is not None:
            click.echo(prompt, nl=False)
        shown.append(True)
        click.echo(text, nl=False)

    stream = None if as_json else stream
    sampling = dict(prompt=prompt, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens, greedy=temperature is None,
                    temperature=temperature or 1.0, top_p=top_p, seed=seed, on_text=stream)
    if runtime == "onnx":  # imports no torch: onnxruntime, numpy, tokenizers
        from .runtime import generate as run_onnx

        torch_only = [flag for flag, given in (("--dtype", dtype is not None), ("--device", device != "cpu"),
                                                ("--kernels", kernels != "auto")) if given]
        if torch_only:
            raise StatecastError(f"{', '.join(torch_only)} {'is' if len(torch_only) == 1 else 'are'} for --runtime torch "
                                 "only (an ONNX graph's dtype is fixed at export; choose the device with --provider)")
        run = functools.partial(run_onnx, path, provider=provider or "cpu", **sampling)
    else:
        from .checkpoints.store import resolve
        from .convert.generate import generate as do_generate

        if provider is not None:
            raise StatecastError("--provider is for --runtime onnx only (use --device)")
        run = functools.partial(do_generate, resolve(path), dtype=dtype, device=device, kernels=kernels, **sampling)
    out = run()
    if as_json:
        click.echo(json.dumps(out))
    elif prompt is None:
        click.echo(out["text"])
    else:
        stream("")  # the prompt, if no text came out
        click.echo()


@main.command()
@click.argument("path")
@click.option("--check", is_flag=True, help="Also hash every tensor of a unified model against its manifest (one read).")
@json_option
@handle_errors
def inspect(path, check, as_json):
    """Describe a unified model or a source checkpoint at PATH."""
    from .checkpoints.store import resolve
    from .convert.describe import inspect_path, render

    info = inspect_path(resolve(path), check=check)
    _emit(info, as_json, lambda i: click.echo(render(i)))


@main.command(name="list")
@json_option
@handle_errors
def list_(as_json):
    """The models in the local store ($STATECAST_HOME)."""
    from .checkpoints.store import list_models, models_dir

    cleaned: list[str] = []
    models = list_models(cleaned=cleaned)
    if cleaned:
        click.echo(f"removed {len(cleaned)} leftover(s) of interrupted runs in {models_dir()}", err=True)

    def human(ms):
        if not ms:
            click.echo(f"no models in {models_dir()}")
        for m in ms:
            n = f"{m['n_params']:>14,}" if isinstance(m.get("n_params"), int) else f"{'?':>14}"
            click.echo(f"{m['name']:40s} {str(m.get('family')):8s} {str(m.get('dtype')):9s} {n} params  {m['status']}")

    _emit(models, as_json, human)


@main.command()
@click.option("--family", "families", multiple=True, type=RegistryChoice(_family_names),
              help="Which family to demonstrate (repeatable; default: all).")
@handle_errors
def demo(families):
    """Offline: build tiny seeded models with transformers, pull, verify, generate, export to ONNX,
    generate through onnxruntime, print the parity reports."""
    from .demo import run_demo

    results = run_demo(families, say=click.echo)
    failed = [f for f, r in results.items()
              if not r["parity"]["passed"] or r["onnx_generate"]["new_ids"] != r["generate"]["new_ids"]]
    if failed:
        click.echo(f"parity FAILED for {', '.join(failed)}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
