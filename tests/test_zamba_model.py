"""Zamba: the hybrid model against transformers' ZambaForCausalLM (with its cache, tied and
untied), the multi-head Mamba mixer against ``ZambaMambaMixer`` and, with one head, against the
Mamba-1 mixer it generalises; our parallel path against our steps (split prompts included); the
state layout; the shared block stored once; config and layout errors."""

from __future__ import annotations

import math
from pathlib import Path

import factories
import pytest
import torch

from statecast.arch.mamba import MambaMixer
from statecast.arch.zamba import Zamba, ZambaConfig
from statecast.checkpoints.layout import open_unified
from statecast.checkpoints.readers import open_tensors, weight_files
from statecast.convert.loading import load_model
from statecast.convert.pull import pull
from statecast.errors import StatecastError
from statecast.export import export
from statecast.families.tables import to_canonical_state
from statecast.families.zamba import HF, config_from_hf, hf_config
from statecast.parity.verify import verify


@pytest.fixture(scope="module", params=["tied", "untied"])
def pair(request, tmp_path_factory):
    """(ours, transformers' model, source dir): hybrid layers 2 and 4 of 6; tied: one shared
    block (transformers ties its copies only with a tied head), untied: one per hybrid layer."""
    from transformers import ZambaForCausalLM

    root = tmp_path_factory.mktemp(f"zamba-{request.param}")
    src = factories.hf_zamba(root / "src", seed=31, tied=request.param == "tied")
    info = pull(str(src), out=root / "unified", progress=False)
    ours, _ = load_model(info["path"])
    ref = ZambaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    return ours, ref, src


def test_logits_and_cached_steps_match_transformers(pair, one_thread):
    from transformers import DynamicCache

    ours, ref, _ = pair
    ids = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids, use_cache=False).logits
        got, _ = ours(ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        cache = DynamicCache(config=ref.config)  # prompt, then single steps, both with caches
        ref_prompt = ref(ids[:, :30], cache=cache, use_cache=True).logits
        ours_prompt, s = ours(ids[:, :30])
        torch.testing.assert_close(ours_prompt, ref_prompt, rtol=1e-5, atol=1e-4)
        for t in range(30, 40):
            ref_step = ref(ids[:, t : t + 1], cache=cache, use_cache=True).logits
            ours_step, s = ours(ids[:, t : t + 1], s)
            torch.testing.assert_close(ours_step, ref_step, rtol=1e-5, atol=1e-4)


def test_shared_block_stored_once_and_state_per_use(pair):
    ours, ref, src = pair
    cfg = ours.cfg
    tied = ref.config.tie_word_embeddings
    assert cfg.layer_kinds == ("mamba", "mamba", "hybrid", "mamba", "hybrid", "mamba")
    assert cfg.shared_blocks == ((None, None, 0, None, 0, None) if tied else (None, None, 0, None, 1, None))
    names = set(ours.state_dict())
    assert {n.split(".")[1] for n in names if n.startswith("shared.")} == ({"0"} if tied else {"0", "1"})
    assert not any(".attn." in n for n in names if n.startswith("layers."))  # attention only in the shared blocks
    assert {n.split(".")[1] for n in names if n.endswith("shared_proj.weight")} == {"2", "4"}  # a linear per use
    state = ours.init_state(2)
    assert state.key.shape[0] == 2 and state.conv.shape[0] == state.ssm.shape[0] == 6  # no placeholders
    assert ours.state_layers() == {"key": (2, 4), "value": (2, 4), "conv": tuple(range(6)), "ssm": tuple(range(6))}
    # each use attends at its own depth: the two uses' keys differ
    _, s = ours(torch.tensor([[1, 2, 3, 4]]))
    assert s.key.shape == (2, 1, cfg.n_kv_head, 4, cfg.head_dim) and not torch.equal(s.key[0], s.key[1])
    from safetensors import safe_open

    with safe_open(src / "model.safetensors", "pt") as f:  # what save_pretrained wrote
        hf_keys = list(f.keys())
    stored = {k.split(".")[2] for k in hf_keys if ".shared_transf." in k}
    assert stored == ({"2"} if tied else {"2", "4"}) and ("lm_head.weight" in hf_keys) == (not tied)


@pytest.mark.parametrize("T", [1, 5, 37])
@pytest.mark.parametrize("warm", [0, 6])
def test_parallel_equals_steps(pair, T, warm, one_thread):
    ours, _, _ = pair
    lp, sp, ls, ss = factories.parallel_and_steps(ours, 200, T, warm=warm)
    torch.testing.assert_close(lp, ls, rtol=1e-4, atol=1e-4)
    for a, b in zip(sp, ss):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_split_prompt_equals_whole(pair, one_thread):
    """A prompt fed in pieces (whole-sequence calls from a carried state) gives the logits and
    state of one call: the KV of each shared-block use, conv and SSM all carry over."""
    ours, _, _ = pair
    ids = torch.randint(0, 200, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole, s_whole = ours(ids)
        parts, s = [], None
        for a, b in ((0, 2), (2, 13), (13, 14), (14, 30)):
            logits, s = ours(ids[:, a:b], s)
            parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-4, atol=1e-4)
    for a, b in zip(s, s_whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _mixer_pair(heads: int):
    from transformers import ZambaConfig as HfZambaConfig
    from transformers.models.zamba.modeling_zamba import ZambaMambaMixer

    torch.manual_seed(heads)
    cfg = HfZambaConfig(hidden_size=24, n_mamba_heads=heads, mamba_d_state=6, mamba_dt_rank=3, num_hidden_layers=4,
                        num_attention_heads=4)
    ref = ZambaMambaMixer(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name not in ("A_log", "D"):
                p.normal_(0, p.shape[-1] ** -0.5)
        ref.dt_proj_bias.uniform_(-4, -2)
    ours = MambaMixer(24, 48, 6, 4, 3, n_heads=heads)
    ucfg = {"layer_kinds": ["mamba"], "shared_blocks": [None]}
    sd = to_canonical_state(HF.for_config(ucfg), {f"model.layers.0.mamba.{k}": v for k, v in ref.state_dict().items()})
    ours.load_state_dict({k.removeprefix("layers.0.mamba."): v for k, v in sd.items()}, strict=True)
    return ours.eval(), ref


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_multi_head_mixer_matches_zamba_mamba_mixer(heads, one_thread):
    """``MambaMixer(n_heads=H)`` against ``ZambaMambaMixer`` (its interleaved in_proj
    reordered, per-head tensors as they are; one head: the head axis dropped), whole sequence
    and one step at a time."""
    ours, ref = _mixer_pair(heads)
    assert (ours.x_proj.weight.dim() == 2) == (heads == 1)
    x = torch.randn(2, 19, 24)
    conv, ssm = torch.zeros(2, 48, 3), torch.zeros(2, 48, 6)
    with torch.no_grad():
        want = ref(x)
        got, c, s = ours(x, conv, ssm)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        steps = []
        c, s = conv, ssm
        for t in range(19):
            y, c, s = ours(x[:, t : t + 1], c, s)
            steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), got, rtol=1e-5, atol=1e-5)


def test_one_head_mixer_is_the_mamba1_mixer(one_thread):
    """``n_heads=1`` builds exactly today's mixer: the same tensors, names and shapes, the same
    init from the same generator, and the same outputs bit for bit."""
    default = MambaMixer(24, 48, 6, 4, 3)
    one = MambaMixer(24, 48, 6, 4, 3, n_heads=1)
    assert {k: v.shape for k, v in default.state_dict().items()} == {k: v.shape for k, v in one.state_dict().items()}
    for m in (default, one):
        m.reset_parameters(torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), one.state_dict().values()))
    x = torch.randn(2, 9, 24)
    conv, ssm = torch.randn(2, 48, 3), torch.randn(2, 48, 6)
    with torch.no_grad():
        for T in (9, 1):
            for a, b in zip(default(x[:, :T], conv, ssm), one(x[:, :T], conv, ssm)):
                assert torch.equal(a, b)
    # and the per-head form with one head's tensors stacked H times computes each head as that mixer
    two = MambaMixer(24, 96, 6, 4, 3, n_heads=2)
    assert two.x_proj.weight.shape == (2, 3 + 12, 48) and two.A_log.shape == (2, 48, 6) and two.D.shape == (2, 48)


def test_config_round_trip_and_refusals(pair):
    ours, ref, _ = pair
    hf = ref.config.to_dict()
    ucfg = ZambaConfig.from_unified(config_from_hf(hf)).to_unified()
    assert ucfg == ours.cfg.to_unified()
    back = hf_config(ucfg, hf)
    assert config_from_hf(back) == config_from_hf(hf) and back["layers_block_type"] == hf["layers_block_type"]
    with pytest.raises(ValueError, match="hidden_mamba_act 'gelu' is not supported"):
        config_from_hf({**hf, "hidden_mamba_act": "gelu"})
    with pytest.raises(ValueError, match="attention_hidden_size 48 is not supported"):
        config_from_hf({**hf, "attention_hidden_size": 48})
    with pytest.raises(ValueError, match=r"layers_block_type \['attention'\] is not supported"):
        config_from_hf({**hf, "layers_block_type": ["hybrid", "attention"] + ["mamba"] * 4})
    with pytest.raises(ValueError, match="shared_blocks must use blocks 0..n-1"):
        ZambaConfig.from_unified({**ucfg, "layer_kinds": ["mamba"] * 6, "shared_blocks": [None] * 6})
    with pytest.raises(ValueError, match="shared_blocks must give a block index for each hybrid layer"):
        ZambaConfig.from_unified({**ucfg, "shared_blocks": [None] * 6})
    # the tie rule of transformers: a tied head with a block per hybrid layer has no ZambaForCausalLM form
    odd = {**ucfg, "shared_blocks": [None, None, 0, None, 1, None], "tie_embeddings": True}
    with pytest.raises(StatecastError, match="ZambaForCausalLM runs one shared block with a tied head"):
        hf_config(odd)
    # the default layout rule (no layers_block_type): mamba, mamba, hybrid, then period/offset
    default = config_from_hf({k: v for k, v in hf.items() if k != "layers_block_type"} | {"attn_layer_period": 2,
                                                                                          "attn_layer_offset": 1})
    assert default["layer_kinds"] == ["mamba", "mamba", "hybrid", "mamba", "hybrid", "mamba"]
    Zamba(ZambaConfig.from_unified(ucfg))  # builds


# hybrid layers 2, 5 and 11 of 12 (ZambaConfig's period 6, offset 2): "11" < "2" < "5" as strings,
# so transformers before 5 (and Zyphra's fork) kept the block under layer 5
THREE_HYBRID = dict(layers=12, attn_period=6, attn_offset=2)


def placed_round_trip(src: Path, root: Path, cls: str, copies: list[list[int]]) -> None:
    """A source holding its shared blocks where ``copies`` says: pull records that placement,
    verify passes against transformers (so transformers loads it, every block filled, the
    reference being the source itself), and ``export --format hf`` gives back the source's
    keys, with the same bytes."""
    info = pull(str(src), out=root / "unified", progress=False)
    assert open_unified(info["path"]).config["shared_copies"] == copies
    r = verify(info["path"], device="cpu", raise_on_fail=False)
    assert r["passed"], (r["checks"], r["first_divergent_layer"])
    assert r["reference"]["implementation"] == f"transformers.{cls}" and r["max_abs_diff"] < 1e-3
    assert r["greedy"]["ours"] == r["greedy"]["reference"]
    out = export(info["path"], "hf", root / "hf")
    with open_tensors(weight_files(src)) as a, open_tensors(weight_files(Path(out["path"]))) as b:
        assert sorted(b.keys()) == sorted(a.keys())
        for k in a.keys():
            assert a.dtype(k) == b.dtype(k) and torch.equal(a.get(k), b.get(k)), k


@pytest.mark.parametrize("holders", [[5], [2, 5, 11]], ids=["last-sorting-only", "every-copy"])
def test_shared_block_under_any_of_its_layers(holders, tmp_path, one_thread):
    """The block stored under the last-sorting hybrid layer only (as Zyphra/Zamba-7B-v1, saved
    by older transformers) or under every hybrid layer: read, run, and written back there."""
    src = factories.hf_zamba(tmp_path / "src", seed=33, **THREE_HYBRID)
    factories.restore_shared(src, "shared_transf", {2: holders})
    placed_round_trip(src, tmp_path, "ZambaForCausalLM", [holders])


def test_unequal_copies_are_refused_in_one_line(tmp_path):
    """Two copies of the tied block that differ (one ulp of one weight): `convert pull` names
    both keys in one line, exit 2, nothing written."""
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from statecast.cli import main

    src = factories.restore_shared(factories.hf_zamba(tmp_path / "src", seed=34, **THREE_HYBRID), "shared_transf",
                                   {2: [5, 11]})
    sd = load_file(src / "model.safetensors")
    key = "model.layers.11.shared_transf.self_attn.k_proj.weight"
    sd[key][1, 2] = torch.nextafter(sd[key][1, 2], torch.tensor(math.inf))
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    r = CliRunner().invoke(main, ["pull", str(src), "--out", str(tmp_path / "u")])
    err = r.stderr.strip()
    assert r.exit_code == 2 and len(err.splitlines()) == 1 and "Traceback" not in r.output, (r.exit_code, r.output)
    assert "'model.layers.5.shared_transf.self_attn.k_proj.weight' and " + repr(key) in err
    assert "copies of one tied tensor but differ" in err and not (tmp_path / "u").exists()


def test_missing_or_partial_block_is_named(tmp_path):
    """No copy of the block at all: the keys expected under its first layer are named; a
    copy lacking a tensor: that tensor is named."""
    from safetensors.torch import load_file, save_file

    src = factories.hf_zamba(tmp_path / "src", seed=35, **THREE_HYBRID)
    sd = load_file(src / "model.safetensors")
    save_file({k: v for k, v in sd.items() if ".shared_transf." not in k}, src / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(StatecastError, match=r"missing tensors model\.layers\.2\.shared_transf\.feed_forward"):
        pull(str(src), out=tmp_path / "u", progress=False)
    partial = {**sd, **{k.replace(".2.", ".11."): v.clone() for k, v in sd.items()
                        if ".2.shared_transf." in k and "k_proj" not in k}}
    save_file(partial, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StatecastError, match=r"missing tensors model\.layers\.11\.shared_transf\.self_attn\.k_proj"
                                             r"\.weight$"):
        pull(str(src), out=tmp_path / "u", progress=False)
    assert not (tmp_path / "u").exists()


def test_shared_copies_checked_on_load(pair, tmp_path):
    """``shared_copies`` is a config field like the others: a layer that does not run the
    block, an empty or unsorted list, or the wrong number of lists is refused."""
    ours, _, _ = pair
    ucfg = ours.cfg.to_unified()
    assert ucfg["shared_copies"] is None  # what transformers 5 writes: the block under its first layer
    blocks = len({b for b in ucfg["shared_blocks"] if b is not None})
    good = [[2, 4]] if blocks == 1 else [[2], [4]]
    assert ZambaConfig.from_unified({**ucfg, "shared_copies": good}).to_unified()["shared_copies"] == good
    for bad in ([[3]], [[]], [[4, 2]], [[2], [4], [2]], [[2, 2]]):
        with pytest.raises(ValueError, match="shared_copies must give, for each of the"):
            ZambaConfig.from_unified({**ucfg, "shared_copies": bad})
    with pytest.raises(ValueError, match="shared_copies"):
        ZambaConfig.from_unified({**ucfg, "shared_copies": [2, 4]})
