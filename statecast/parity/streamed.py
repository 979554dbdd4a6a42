"""Layer-streamed ``convert verify``: the parity report of a model that need not fit in memory.

The same report as :func:`statecast.parity.verify.run_parity` (same inputs, same metrics,
same tolerances and judging, same per-layer hidden-state NMSE), computed with about one
block's weights in memory at a time:

* **ours**: statecast's model is built on the meta device (shapes only). The tensors outside
  ``layers.`` (embedding, learned positions, RWKV's ``embed_norm``, final norm, head; a tied
  head is the embedding) are made resident for our passes only (:meth:`StreamedModel.resident`);
  block ``i``'s tensors (``layers.{i}.*``) are mapped from the model's safetensors files by a
  forward pre-hook on ``model.layers[i]`` (``load_state_dict(assign=True)``: zero-copy on the
  CPU in the stored dtype, each tensor its own memory map) and put back on the meta device by
  a forward hook after the block ran, which drops the last reference to its maps (unmapped:
  the file pages leave the process's RSS). Every family's forward calls each block once per
  pass (RWKV: once per 512-token segment; a block called again is simply mapped again).
* **the reference**: transformers' class loaded with accelerate's big-model inference,
  ``from_pretrained(path, device_map=..., offload_folder=...)`` with every decoder block on
  ``"disk"``: accelerate's ``AlignDevicesHook`` (one per module that owns tensors: a Linear's
  weight is read when that Linear runs) loads a module's tensors just before it runs and drops
  them after, reading them from the ORIGINAL safetensors files (transformers' disk-offload
  index points into them; nothing is copied to disk). ``from_pretrained`` itself reads every
  tensor once while loading, one at a time, and drops it. Tensors that
  transformers converts while loading (Jamba's per-expert tensors fused into stacks, ``.bin``
  sources) are re-saved into the offload folder first (a temporary directory, removed
  afterwards): that costs their size on disk, not in memory. On the CPU everything is on
  ``"disk"``; on one GPU the modules outside the blocks sit on that GPU (the main device) and
  the blocks stream from disk. ``device_map="auto"`` hands placement to accelerate
  (``infer_auto_device_map`` over every visible GPU, then CPU, then disk, within ``max_memory``):
  the multi-GPU mode.

Both sides run one after the other (ours, released, then the reference), so the peak is one
side's embedding and head plus a block of weights and the activations. Hidden states are
compared layer by layer as the reference's blocks produce them (forward hooks on its decoder
blocks, as :class:`~statecast.families.references.HfReference`), against ours kept on the CPU.
Two things keep that peak honest: transformers' loader reads the checkpoint through
safetensors' ``pread`` backend instead of a memory map (:func:`_pread_checkpoints`), and the
C heap is trimmed after every block (:func:`_trim`). Measured (``bench/bench_verify_memory.py``,
a 386 MB Llama, 40 blocks): peak RSS +76 MB over an import-only process, against +863 MB for
the in-memory report, with identical metrics.

Same numbers as the in-memory report, to the last bit: each side computes the same function
on the same bytes in the same order (offloading moves weights, not arithmetic), so every
metric, per-layer NMSE and (with ``decode``) greedy token is equal (``tests/test_streamed_verify.py``,
every family). transformers' disk-offload index drops ``_keep_in_fp32_modules`` (RWKV's decay
and bonus in float16); :func:`_keep_fp32_offloaded` restores them.

Greedy decoding and step-vs-parallel are **skipped by default** (recorded under
``streamed.skipped``, not judged): each decoded token and each step is another full pass over
every weight, so 32 greedy tokens and 64 steps would read the model about 130 more times than
the logit comparison (4 passes). ``decode=True`` runs both, streamed, through the same code as
the in-memory report. Native references (BlinkDL's ``rwkv`` package, the state-spaces Mamba
loader) load their file whole: refused here.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from importlib import metadata
from pathlib import Path

import torch

from ..checkpoints.layout import UnifiedModel
from ..checkpoints.readers import dtype_name, parse_dtype
from ..convert.generate import generate_ids
from ..convert.loading import check_kernels, load_tokenizer, select_kernels
from ..errors import StatecastError
from ..families import FAMILIES, format_by_name
from ..families.references import HfReference, _decoder_blocks, present_hidden
from .metrics import (
    GREEDY_PROMPT,
    GREEDY_TOKENS,
    compare_logits,
    logit_scale,
    relative,
)

SKIPPED_WITHOUT_DECODE = ("greedy_agreement", "step_vs_parallel_max_abs_diff", "step_vs_parallel_rel_diff")
_BLOCK = re.compile(r"layers\.(\d+)\.")


# --------------------------------------------------------------------------- ours


class StreamedModel:
    """statecast's model on the meta device, its weights mapped from the unified model's files
    only while they are used: the tensors outside ``layers.`` inside :meth:`resident`, block ``i``
    for the duration of its forward call. ``model`` is an ordinary statecast model otherwise
    (call it inside ``resident()``). ``loads`` counts block loads (tests: one per block per pass)."""

    def __init__(self, um: UnifiedModel, dtype: str, device: torch.device, kernels: str = "auto"):
        fam = FAMILIES[um.family]
        check_kernels(um.family, kernels)
        self.family, self.device, self.target = fam, torch.device(device), parse_dtype(dtype)
        self.model = fam.build(um.config, "meta").eval()
        # which whole-sequence path runs (the model stays on meta: say where it will run)
        self.kernels = select_kernels(self.model, um.family, kernels, device=self.device, dtype=self.target)
        self.src = um.tensors()
        expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        present = set(self.src.keys())
        if missing := sorted(expected.keys() - present):
            raise StatecastError(f"{um.path}: tensor {missing[0]} is missing from the model files")
        if unexpected := sorted(present - expected.keys()):
            raise StatecastError(f"{um.path}: unexpected tensor {unexpected[0]} in the model files")
        if wrong := next((k for k, shape in expected.items() if self.src.shape(k) != shape), None):
            raise StatecastError(f"{um.path}: tensor {wrong} has shape {list(self.src.shape(wrong))}, "
                                 f"the model expects {list(expected[wrong])}")
        n_layer = len(self.model.layers)
        self.block_keys: list[list[str]] = [[] for _ in range(n_layer)]
        self.rest: list[str] = []
        for name in expected:
            m = _BLOCK.match(name)
            (self.block_keys[int(m.group(1))] if m else self.rest).append(name)
        self.loads = 0
        self._hooks = []
        for i, block in enumerate(self.model.layers):
            self._hooks.append(block.register_forward_pre_hook(self._loader(i)))
            self._hooks.append(block.register_forward_hook(self._releaser()))

    def _tensor(self, name: str) -> torch.Tensor:
        t = self.src.get(name)  # its own memory map, unmapped when the tensor is freed
        return t.to(self.family.storage_dtype(name, t.dtype, self.target)).to(self.device)

    def _loader(self, i: int):
        prefix = f"layers.{i}."

        def load(block, args):
            block.load_state_dict({k[len(prefix):]: self._tensor(k) for k in self.block_keys[i]}, strict=True, assign=True)
            self.loads += 1

        return load

    @staticmethod
    def _releaser():
        def release(block, args, output):
            block.to_empty(device="meta")  # the last references to the block's maps go
            _trim()

        return release

    @contextlib.contextmanager
    def resident(self):
        """The tensors outside the blocks, mapped for the duration of the ``with``; on the way out
        every weight is back on the meta device (also a block's, should its forward have raised)."""
        self.model.load_state_dict({k: self._tensor(k) for k in self.rest}, strict=False, assign=True)
        try:
            yield self.model
        finally:
            self.model.to_empty(device="meta")
            _trim()

    def is_released(self) -> bool:
        """Whether every weight is back on the meta device (nothing mapped)."""
        return all(p.is_meta for p in self.model.parameters())

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self.src.close()


# --------------------------------------------------------------------------- the reference


class StreamedHfReference(HfReference):
    """transformers' class for the source architecture, loaded with accelerate's big-model
    inference (module docstring): the decoder blocks offloaded to ``"disk"`` (read in place
    from the original safetensors), or ``device_map="auto"`` placement within ``max_memory``.
    ``logits``, ``hidden`` and ``greedy`` are :class:`HfReference`'s; :meth:`run` gives the
    logits and feeds each block's output to a callback in one pass."""

    def __init__(self, path: Path, device: torch.device, arch, ucfg: dict, dtype: torch.dtype, offload_folder: str,
                 device_map: str | None = None, max_memory: dict | None = None):
        import transformers
        from accelerate import init_empty_weights
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        cls = getattr(transformers, arch.architecture)
        kwargs = dict(arch.reference_kwargs)
        self.implementation = f"transformers.{arch.architecture}"
        self.version = metadata.version("transformers")
        self.dtype = dtype
        if device_map == "auto":
            placement = "auto"
            self.device = torch.device("cpu")  # accelerate's hooks move the inputs to the first module's device
        elif device_map is not None:
            raise StatecastError(f"unknown device map {device_map!r}; choose auto (accelerate's placement over every GPU)")
        else:
            config = cls.config_class.from_pretrained(path, **kwargs)
            with init_empty_weights():
                skeleton = cls._from_config(config)
            placement = _block_device_map(skeleton, ucfg["n_layer"], device)
            del skeleton
            self.device = device
        with _quiet_accelerate(), _pread_checkpoints():
            self.model = cls.from_pretrained(path, dtype=dtype, device_map=placement, max_memory=max_memory,
                                             offload_folder=offload_folder, **kwargs).eval()
        _keep_fp32_offloaded(self.model, dtype)
        self.device_map = {k: str(v) for k, v in getattr(self.model, "hf_device_map", {"": str(device)}).items()}
        if device_map == "auto":
            first = next((v for v in self.device_map.values() if v not in ("cpu", "disk")), "cpu")
            self.device = torch.device("cpu" if first == "cpu" else f"cuda:{first}" if first.isdigit() else first)
        self.blocks = _decoder_blocks(self.model, ucfg["n_layer"])
        on_disk = sum(v == "disk" for v in self.device_map.values())
        self.weights = (f"from_pretrained({str(path)!r}, dtype={dtype_name(dtype)}"
                        f"{''.join(f', {k}={v!r}' for k, v in arch.reference_kwargs)}, "
                        + (f"device_map='auto', max_memory={max_memory!r}" if device_map == "auto"
                           else f"device_map=<the {ucfg['n_layer']} blocks on 'disk', the rest on "
                                f"{'disk' if device.type == 'cpu' else device}>")
                        + f", offload_folder=<temporary>) with accelerate {metadata.version('accelerate')}: "
                        f"{on_disk} of {len(self.device_map)} placed modules streamed from disk")

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, on_block) -> torch.Tensor:
        """[B, T] ids -> [B, T, V] float32 logits on the CPU; ``on_block(i, hidden)`` with each
        block's output (float32, CPU) as it is produced (``HfReference.hidden``'s view of it)."""
        hooks = []
        for i, b in enumerate(self.blocks):
            def grab(module, args, output, i=i):
                on_block(i, (output[0] if isinstance(output, tuple) else output).float().cpu())
                _trim()

            hooks.append(b.register_forward_hook(grab))
        try:
            return self.model(ids.to(self.device), use_cache=False).logits.float().cpu()
        finally:
            for h in hooks:
                h.remove()


def _trim() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Between blocks the process holds little, but glibc keeps what a block's temporaries freed
    (its dynamic mmap threshold puts the next ones on the heap, and every thread has its own
    arena): over a pass that grew to ~40 MB on a 309 MB model, more under CPU contention,
    which is memory the block after does not reuse in place. Trimming after each block costs
    well under a millisecond and keeps the peak at what is live."""
    if _libc_trim is not None:
        _libc_trim(0)


def _load_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_libc_trim = _load_trim()


def _block_device_map(model: torch.nn.Module, n_layer: int, device: torch.device) -> dict[str, str | int]:
    """Every decoder block on ``"disk"``; every other module that holds a tensor of the state
    dict on ``device`` (a GPU: the main device, where accelerate runs everything) or on
    ``"disk"`` too (the CPU: then nothing of the reference stays resident between passes)."""
    blocks = _decoder_blocks(model, n_layer)
    prefix = next(name for name, m in model.named_modules() if m is blocks)
    rest: str | int = "disk" if device.type == "cpu" else (device.index or 0)
    placement: dict[str, str | int] = {}
    depth = prefix.count(".") + 2 if prefix else 1
    for name in model.state_dict():
        if prefix and name.startswith(prefix + "."):
            placement[".".join(name.split(".")[:depth])] = "disk"
        else:
            placement[name.rpartition(".")[0] or name] = rest
    return placement


def _keep_fp32_offloaded(model, dtype: torch.dtype) -> None:
    """Give the disk-offloaded tensors the dtypes an in-memory ``from_pretrained`` gives them.

    transformers 5.24 writes the dtype of the not-yet-loaded model into its disk-offload index
    (``accelerate_disk_offload``), before ``_keep_in_fp32_modules`` is applied: in float16,
    RWKV's ``time_decay``/``time_first`` would be read back as float16 where the in-memory
    reference keeps them in float32 (another function: its greedy tokens diverge). The plan is
    transformers' own (``_get_dtype_plan``, matched as its loader does). Both the index (the one
    dict every accelerate hook of the model reads, patched in place) and the offloaded meta
    parameter change: accelerate casts what it reads to the dtype of the parameter it replaces."""
    plan = model._get_dtype_plan(dtype)
    if not plan:
        return
    from transformers.core_model_loading import build_glob_alternation

    pattern, group_glob, _ = build_glob_alternation(list(plan))

    def planned(name: str) -> torch.dtype | None:
        m = pattern.search(name)
        return None if m is None else plan[group_glob[m.lastgroup]]

    for index in _offload_indexes(model):
        for name, info in index.items():
            if (want := planned(name)) is not None:
                info["dtype"] = dtype_name(want)
    # accelerate's hook casts what it reads to the dtype of the parameter it replaces
    for name, param in list(model.named_parameters()):
        if param.is_meta and (want := planned(name)) is not None and param.dtype != want:
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            module._parameters[leaf] = torch.nn.Parameter(torch.empty_like(param, dtype=want), requires_grad=False)


def _offload_indexes(model) -> list[dict]:
    """The offload indexes (name -> file, dtype) behind the model's accelerate hooks, each once."""
    seen: dict[int, dict] = {}
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            loader = getattr(getattr(h, "weights_map", None), "dataset", None)
            index = getattr(loader, "index", None)
            if isinstance(index, dict):
                seen.setdefault(id(index), index)
    return list(seen.values())


@contextlib.contextmanager
def _pread_checkpoints():
    """transformers' loader reading the safetensors files with ``pread`` instead of a memory map.

    With a ``device_map`` holding ``"disk"``, ``from_pretrained`` still reads every tensor once,
    in turn (and drops it: the offload index points into the original files). Through its
    default ``mmap`` backend every page read stays mapped, so counted in the process's RSS, until
    the last file closes: the whole checkpoint by the end of loading (79 MB model: +39 MB peak
    RSS; clean page cache the kernel can reclaim, but the peak is what a memory cap sees).
    transformers itself switches to safetensors' ``pread`` backend where mapping whole files
    is a problem (Windows, MPS); this does the same, for the duration of the load (the loader
    opens files through ``transformers.modeling_utils.safe_open``; untouched if that changes)."""
    import transformers.modeling_utils as mu

    original = getattr(mu, "safe_open", None)
    if original is None:
        yield
        return

    def safe_open(filename, framework, device="cpu", backend="mmap", **kwargs):
        return original(filename, framework=framework, device=device, backend="pread", **kwargs)

    mu.safe_open = safe_open
    try:
        yield
    finally:
        mu.safe_open = original


@contextlib.contextmanager
def _quiet_accelerate():
    """accelerate logs a warning that offloaded parameters sit on the meta device: here, by design."""
    import logging

    log = logging.getLogger("accelerate.big_modeling")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


def parse_max_memory(text: str) -> dict[int | str, str]:
    """``--max-memory``'s ``0=70GiB,1=70GiB,cpu=100GiB`` as accelerate's ``max_memory`` dict
    (GPU indices as ints); a size accelerate would not read is a one-line error."""
    out: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, size = part.partition("=")
        key, size = key.strip(), size.strip()
        if not sep or not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)?", size, re.IGNORECASE) or not (key.isdigit() or key == "cpu"):
            raise StatecastError(f"--max-memory {text!r}: expected DEVICE=SIZE pairs such as 0=70GiB,cpu=100GiB "
                                 f"(DEVICE a GPU index or cpu), got {part!r}")
        out[int(key) if key.isdigit() else key] = size
    if not out:
        raise StatecastError(f"--max-memory {text!r}: expected DEVICE=SIZE pairs such as 0=70GiB,cpu=100GiB")
    return out


# --------------------------------------------------------------------------- the report


@torch.inference_mode()
def streamed_parity(um: UnifiedModel, ref_path: Path, device: torch.device, dtype: str, *, kernels: str = "auto",
                    progress=None, device_map: str | None = None, max_memory: dict | None = None,
                    decode: bool = False, offload_folder: str | Path | None = None) -> dict:
    """:func:`~statecast.parity.verify.run_parity`'s report, layer-streamed (module docstring).

    ``um``: the opened unified model; ``ref_path``: its original files (already checked by the
    caller); ``device``: resolved; ``dtype``: the dtype ours computes in (the caller's
    ``dtype or default_dtype(um.meta)``). ``device_map="auto"``: accelerate places the reference
    over every GPU, then CPU, then disk, within ``max_memory`` (accelerate's dict, e.g.
    ``{0: "70GiB", 1: "70GiB", "cpu": "100GiB"}``). ``decode``: also greedy decoding and
    step-vs-parallel, streamed (about 100 more passes over every weight). ``offload_folder``:
    where transformers re-saves tensors it converts while loading (default: a temporary
    directory), removed afterwards."""
    from .verify import _inputs, build_report, step_vs_parallel, tolerances

    step = progress or (lambda msg: None)
    src = um.source
    _, arch, fmt = format_by_name(src.get("format", ""))
    if arch is None:
        raise StatecastError(f"streamed verify needs a Hub-format source read by transformers; {um.path} was converted "
                             f"from {fmt.name}, whose reference loads the whole file: verify it without --stream")
    if device_map is not None and device_map != "auto":
        raise StatecastError(f"unknown device map {device_map!r}; choose auto (accelerate's placement over every GPU)")
    if max_memory is not None and device_map is None:
        raise StatecastError("--max-memory is a budget for accelerate's placement: pass it with --device-map auto")
    if device_map == "auto" and not torch.cuda.is_available():
        raise StatecastError("--device-map auto places the reference over the GPUs, and no CUDA device is available")
    tol = tolerances(um.family, dtype)
    tok = load_tokenizer(um)
    batches = _inputs(um.config["vocab_size"], tok)
    n_layer = um.config["n_layer"]

    step("ours: streaming blocks from the model files")
    ours = StreamedModel(um, dtype, device, kernels)
    ours_logits, ours_hidden = [], []
    try:
        with ours.resident() as model:
            for ids in batches:
                logits, _, hidden = model(ids.to(device), output_hidden=True)
                ours_logits.append(logits.float().cpu())
                ours_hidden.append([h.cpu() for h in hidden])
                del logits, hidden
            if decode:
                step("ours: greedy decoding and step vs parallel (streamed)")
                prompt = batches[-1][0, :GREEDY_PROMPT].tolist()
                ours_greedy = generate_ids(model, prompt, GREEDY_TOKENS)
                step_diff, parallel, step_rules = step_vs_parallel(model, batches[0].to(device), ours_logits[0])
    finally:
        ours.close()

    step("reference: streaming blocks (accelerate disk offload)")
    layer_err, layer_pow = [0.0] * n_layer, [0.0] * n_layer
    pairs = []
    with tempfile.TemporaryDirectory(prefix="statecast-offload-", dir=offload_folder) as folder:
        ref = StreamedHfReference(ref_path, device, arch, um.config, parse_dtype(dtype), folder, device_map, max_memory)
        view = ref.hidden_view
        for b, ids in enumerate(batches):
            def compare(i, rh, b=b):
                oh = present_hidden(ours_hidden[b][i].cpu(), view).double()
                rh = rh.double()
                layer_err[i] += float((oh - rh).pow(2).sum())
                layer_pow[i] += float(rh.pow(2).sum())

            pairs.append((ours_logits[b], ref.run(ids, compare)))
            ours_hidden[b] = None
        metrics = compare_logits(pairs)
        if decode:
            step("reference: greedy decoding (streamed)")
            ref_greedy = ref.greedy(prompt, GREEDY_TOKENS)
        reference = {"implementation": ref.implementation, "version": ref.version, "path": str(ref_path),
                     "dtype": dtype_name(ref.dtype), "weights": ref.weights}
        placement = ref.device_map
        del ref

    if decode:
        metrics["greedy_agreement"] = sum(a == b for a, b in zip(ours_greedy, ref_greedy)) / GREEDY_TOKENS
        metrics["step_vs_parallel_max_abs_diff"] = step_diff
        metrics["step_vs_parallel_rel_diff"] = relative(step_diff, logit_scale(parallel))
    greedy = {"prompt": prompt, "tokens": GREEDY_TOKENS, "ours": ours_greedy, "reference": ref_greedy} if decode else None
    report = build_report(um, reference=reference, device=device, dtype=dtype, kernels=ours.kernels, metrics=metrics,
                          layer_err=layer_err, layer_pow=layer_pow, per_layer_view=view, tol=tol, batches=batches,
                          greedy=greedy, step_rules=step_rules if decode else ())
    report["streamed"] = {
        "ours": "meta-device model; each block's tensors mapped from the model files for its forward, then released",
        "reference": "accelerate big-model inference (transformers from_pretrained with device_map and disk offload)",
        "device_map": "auto" if device_map == "auto" else "blocks on disk",
        "placement": placement,
        "decode": decode,
        "skipped": [] if decode else list(SKIPPED_WITHOUT_DECODE),
    }
    return report
