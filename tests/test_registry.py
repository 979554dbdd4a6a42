"""The family registry: every record is complete and exercised, detection never depends on
the order families are tried in, and the package's stages import only the stages below them."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from test_onnx import ONNX_SOURCES

import statecast
from statecast import families as registry
from statecast.families import FAMILIES, detect
from statecast.families.record import Family, NativeFormat
from statecast.parity.metrics import LOWER, UPPER
from statecast.parity.verify import TOLERANCES

# The pipeline's stages, lowest first: a module may import its own stage and the ones before it.
STAGES = ("errors", "checkpoints", "runtime", "arch", "families", "convert", "parity", "export", "demo", "cli")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_record_is_complete(name, tmp_path):
    """Every field is filled and consistent with the model: the classes import and round-trip
    their unified config, the record names every state field the model has, the demo builder
    makes a checkpoint that detection gives back to this family and that the model loads."""
    from statecast.convert.loading import load_model
    from statecast.convert.pull import pull

    fam = FAMILIES[name]
    for f in dataclasses.fields(Family):
        assert getattr(fam, f.name) is not None or f.name == "native", f.name
    assert fam.hf or fam.native, "a family reads at least one format"
    assert fam.kernels[0] == "torch"  # the pure path is the default and always there
    for dtype, bounds in fam.tolerances.items():
        assert dtype in TOLERANCES and set(bounds) <= set(UPPER + LOWER + ("layer_nmse_db",))
    import transformers

    for arch in fam.hf:
        assert hasattr(transformers, arch.architecture) and arch.formats
    src = fam.demo.build(tmp_path / "src")
    det = detect(src)
    assert det.family is fam
    model, um = load_model(pull(str(src), out=tmp_path / "u", progress=False)["path"])
    cfg_cls, model_cls = fam.model_classes()
    assert isinstance(model, model_cls) and cfg_cls.from_unified(um.config).to_unified() == um.config
    state = model.init_state(1)
    assert set(type(state)._fields) <= set(fam.state), "every state field needs its ONNX name"
    assert set(model.state_layers()) == set(type(state)._fields)
    logits, _ = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, um.config["vocab_size"])


def test_every_source_format_has_a_test_source():
    """Each format of each family is made by a test builder (tests/test_onnx.py's ONNX_SOURCES,
    which the ONNX, verify and round-trip matrices draw on) and detected as that format."""
    formats = {fmt.name for fam in FAMILIES.values() for _, fmt in fam.formats()}
    tested = set()
    root = Path(pytest.importorskip("tempfile").mkdtemp())
    for name, build in ONNX_SOURCES.items():
        tested.add(detect(build(root / name)).fmt.name)
    assert formats == tested, f"formats without a test source: {sorted(formats - tested)}"


def test_registry_refuses_two_claims_of_one_name():
    rwkv = FAMILIES["rwkv"]
    with pytest.raises(ValueError, match="family rwkv is claimed by both rwkv and rwkv"):
        registry._registry(rwkv, rwkv)
    twin = dataclasses.replace(FAMILIES["mamba"], name="mamba-twin")
    with pytest.raises(ValueError, match="model_type mamba is claimed by both mamba and mamba-twin"):
        registry._registry(FAMILIES["mamba"], twin)


def test_two_native_matchers_accepting_a_checkpoint_is_an_error(native_pth, monkeypatch):
    """Detection runs every family's matcher: a checkpoint two accept is refused, naming both,
    whatever order the families are registered in."""
    greedy = dataclasses.replace(FAMILIES["mamba"], name="greedy",
                                 native=dataclasses.replace(FAMILIES["mamba"].native, match=lambda keys, cfg: True))
    for order in ((FAMILIES["rwkv"], greedy), (greedy, FAMILIES["rwkv"])):
        monkeypatch.setattr(registry, "FAMILIES", {f.name: f for f in order})
        with pytest.raises(statecast.errors.StatecastError, match="rwkv-native.*mamba-native|mamba-native.*rwkv-native"):
            detect(native_pth)


def test_near_miss_names_the_unsupported_variant(tmp_path):
    """A checkpoint no family accepts, but one family recognises as a variant it does not read,
    gets that family's reason (here: a later RWKV generation's tensor)."""
    import factories

    sd = factories.native_rwkv4_state()
    sd["blocks.0.att.time_maa_x"] = torch.zeros(1, 1, 32)
    torch.save(sd, tmp_path / "RWKV-x060-tiny.pth")
    with pytest.raises(statecast.errors.StatecastError, match="RWKV-6 native checkpoints are not supported"):
        detect(tmp_path / "RWKV-x060-tiny.pth")
    assert isinstance(FAMILIES["rwkv"].native, NativeFormat)


def _imports(path: Path) -> list[str]:
    """The statecast modules ``path`` imports (module level and inside functions), absolute."""
    package = ".".join(path.relative_to(Path(statecast.__file__).parent.parent).with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0] + ".__init__"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("statecast")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: -node.level]
                mod = ".".join(base + ([node.module] if node.module else []))
                out += [f"{mod}.{a.name}" if not node.module else mod for a in node.names]
            elif node.module and node.module.startswith("statecast"):
                out.append(node.module)
    return out


def _stage(module: str) -> int | None:
    parts = module.split(".")
    return STAGES.index(parts[1]) if len(parts) > 1 and parts[1] in STAGES else None


def test_stages_import_only_the_stages_below_them():
    root = Path(statecast.__file__).parent
    upward = []
    for path in sorted(root.rglob("*.py")):
        own = _stage("statecast." + ".".join(path.relative_to(root).with_suffix("").parts))
        if own is None:
            continue
        for target in _imports(path):
            stage = _stage(target)
            if stage is not None and stage > own:
                upward.append(f"{path.relative_to(root)} imports {target}")
    assert not upward, upward
