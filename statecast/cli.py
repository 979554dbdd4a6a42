"""The ``convert`` (alias ``statecast``) command line. Thin: each command calls one library function."""

from __future__ import annotations

import functools
import json
import sys

import click

from . import __version__
from .errors import StatecastError


def _emit(obj, as_json: bool, human) -> None:
    if as_json:
        click.echo(json.dumps(obj, indent=2))
    else:
        human(obj)


def handle_errors(fn):
    """One line on stderr and the error's exit status (2 for bad input), never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StatecastError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


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
    "--kernels", default="torch", show_default=True,
    help="Whole-sequence implementation: 'torch' is the pure-PyTorch path; 'compiled' builds the family's "
         "C++ CPU kernel where it has one (Mamba's scan; needs a C++ compiler).")


def dtype_option(help_text: str):
    return click.option("--dtype", type=dtype_choice, default=None, help=help_text)


def provider_option(help_text: str):
    """onnxruntime's execution provider; None when not given (the command says where it applies)."""
    return click.option("--provider", type=click.Choice(["cpu", "cuda"]), default=None, help=help_text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="statecast")
def main() -> None:
    """Convert sequence-model checkpoints to one unified layout, verify parity, export, generate."""


@main.command()
@click.argument("source")
@click.option("--revision", default=None, help="Hub branch, tag or commit (Hub sources only).")
@click.option("--out", type=click.Path(), default=None, help="Output directory (default: the local store).")
@dtype_option("Cast floating weights (default: keep the source dtype).")
@force_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
@json_option
@handle_errors
def pull(source, revision, out, dtype, force, quiet, as_json):
    """Fetch SOURCE (Hub repo id, Hub-format dir or native checkpoint) and convert it."""
    from .convert.pull import pull as do_pull

    info = do_pull(source, revision=revision, out=out, dtype=dtype, force=force, progress=not quiet and not as_json)
    _emit(info, as_json, lambda i: click.echo(i["path"]))


@main.command()
@click.argument("path")
@device_option
@dtype_option("Run our model in this dtype (default: float32, or the dtype `pull --dtype` cast to; the reference runs in float32).")
@click.option("--reference", type=click.Path(), default=None, help="Original files, if they moved since conversion.")
@kernels_option
@json_option
@handle_errors
def verify(path, device, dtype, reference, kernels, as_json):
    """Compare the converted model at PATH with the original implementation; write parity.json/.md."""
    from .checkpoints.store import resolve
    from .parity.verify import render_markdown
    from .parity.verify import verify as do_verify

    report = do_verify(resolve(path), device=device, dtype=dtype, reference=reference, kernels=kernels, raise_on_fail=False,
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
@click.option("--temperature", type=click.FloatRange(0, min_open=True), default=None)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
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
    if greedy and temperature is not None:
        raise StatecastError("--greedy and --temperature exclude each other")
    stream = None if as_json else (lambda s: click.echo(s, nl=False))
    sampling = dict(prompt=prompt, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens, greedy=temperature is None,
                    temperature=temperature or 1.0, top_p=top_p, seed=seed, on_text=stream)
    if runtime == "onnx":  # imports no torch: onnxruntime, numpy, tokenizers
        from .runtime import generate as run_onnx

        torch_only = [flag for flag, given in (("--dtype", dtype is not None), ("--device", device != "cpu"),
                                                ("--kernels", kernels != "torch")) if given]
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
    if stream and prompt is not None:
        click.echo(prompt, nl=False)
    out = run()
    if as_json:
        click.echo(json.dumps(out))
    elif prompt is None:
        click.echo(out["text"])
    else:
        click.echo()


@main.command()
@click.argument("path")
@json_option
@handle_errors
def inspect(path, as_json):
    """Describe a unified model or a source checkpoint at PATH."""
    from .checkpoints.store import resolve
    from .convert.describe import inspect_path, render

    info = inspect_path(resolve(path))
    _emit(info, as_json, lambda i: click.echo(render(i)))


@main.command(name="list")
@json_option
@handle_errors
def list_(as_json):
    """The models in the local store ($STATECAST_HOME)."""
    from .checkpoints.store import list_models, models_dir

    models = list_models()

    def human(ms):
        if not ms:
            click.echo(f"no models in {models_dir()}")
        for m in ms:
            verified = {True: "verified", False: "parity FAILED", None: "not verified"}[m["verified"]]
            click.echo(f"{m['name']:40s} {m['family']:8s} {m['dtype']:9s} {m['n_params']:>14,} params  {verified}")

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
