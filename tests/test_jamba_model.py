"""Jamba: the hybrid model against transformers' JambaForCausalLM, its MoE layer against
``JambaSparseMoeBlock``, our parallel path against our steps, the per-kind state stacks,
and conversion errors and streaming specific to stacked experts."""

from __future__ import annotations

import json
import shutil

import factories
import pytest
import torch

from statecast.arch.jamba import Jamba, JambaConfig
from statecast.arch.layers import MoE
from statecast.arch.mamba import SCAN_SEGMENT
from statecast.convert.loading import load_model
from statecast.convert.pull import pull
from statecast.errors import StatecastError


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(ours, transformers' model) from one tiny checkpoint: attention on layers 1 and 4 of
    6, experts on even layers, top-2 routing."""
    from transformers import JambaForCausalLM

    root = tmp_path_factory.mktemp("jamba")
    src = factories.hf_jamba(root / "src", seed=21, layers=6, attn_period=3, attn_offset=1, expert_period=2,
                             expert_offset=0)
    info = pull(str(src), out=root / "unified", progress=False)
    ours, _ = load_model(info["path"])
    ref = JambaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    return ours, ref


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_matches_transformers_sparse_moe_block(top_k, one_thread):
    from transformers import JambaConfig as HfJambaConfig
    from transformers.models.jamba.modeling_jamba import JambaSparseMoeBlock

    torch.manual_seed(top_k)
    cfg = HfJambaConfig(hidden_size=24, intermediate_size=40, num_experts=5, num_experts_per_tok=top_k)
    ref = JambaSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ours = MoE(24, 40, 5, top_k, "silu")
    gate, up = ref.experts.gate_up_proj.detach().chunk(2, dim=1)  # [X, 2F, C] -> [X, F, C] twice
    ours.load_state_dict({"router.weight": ref.router.weight.detach(), "gate": gate, "up": up,
                          "down": ref.experts.down_proj.detach()})
    x = torch.randn(3, 7, 24)
    with torch.no_grad():
        want = ref(x)
        got = ours(x)
        gathered = ours._gathered(x.reshape(-1, 24), *ours.route(x.reshape(-1, 24))).view(3, 7, 24)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    torch.testing.assert_close(gathered, want, rtol=0, atol=2e-6)  # the export path
    # Jamba keeps the top-k probabilities unnormalised: with k < X they sum below 1
    w, _ = ours.route(x.reshape(-1, 24))
    assert (w.sum(-1) < 1 - 1e-4).all() if top_k < 5 else torch.allclose(w.sum(-1), torch.ones(21))


def test_logits_and_cached_steps_match_transformers(pair, one_thread):
    from transformers import DynamicCache

    ours, ref = pair
    ids = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids, use_cache=False).logits
        got, state = ours(ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        # prompt, then single steps, both with caches
        cache = DynamicCache(config=ref.config)
        ref_prompt = ref(ids[:, :30], cache=cache, use_cache=True).logits
        ours_prompt, s = ours(ids[:, :30])
        torch.testing.assert_close(ours_prompt, ref_prompt, rtol=1e-5, atol=1e-4)
        for t in range(30, 40):
            ref_step = ref(ids[:, t : t + 1], cache=cache, use_cache=True).logits
            ours_step, s = ours(ids[:, t : t + 1], s)
            torch.testing.assert_close(ours_step, ref_step, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("T,warm", [(SCAN_SEGMENT * 2 + 5, 0), (20, 7)])
def test_parallel_equals_steps(pair, T, warm, one_thread):
    """A prompt longer than two segments of the Mamba scan, and a warm start."""
    ours, _ = pair
    lp, sp, ls, ss = factories.parallel_and_steps(ours, 200, T, warm)
    torch.testing.assert_close(lp, ls, rtol=1e-5, atol=1e-4)
    for a, b in zip(sp, ss):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_split_prompt_equals_one_call(pair, one_thread):
    ours, _ = pair
    ids = torch.randint(0, 200, (1, 75), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole, s_whole = ours(ids)
        a, s = ours(ids[:, :33])
        b, s = ours(ids[:, 33:], s)
    torch.testing.assert_close(torch.cat([a, b], 1), whole, rtol=1e-5, atol=1e-4)
    for x, y in zip(s, s_whole):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-4)


def test_state_has_one_stack_per_kind_and_no_placeholders(pair):
    ours, _ = pair
    cfg = ours.cfg
    assert ours.state_layers() == {"key": (1, 4), "value": (1, 4), "conv": (0, 2, 3, 5), "ssm": (0, 2, 3, 5)}
    s = ours.init_state(3)
    assert s.key.shape == (2, 3, cfg.n_kv_head, 0, cfg.head_dim) and s.value.shape == s.key.shape
    assert s.conv.shape == (4, 3, cfg.d_inner, cfg.d_conv - 1) and s.ssm.shape == (4, 3, cfg.d_inner, cfg.d_state)
    assert s.ssm.dtype == torch.float32
    with torch.no_grad():
        _, s = ours(torch.zeros(3, 9, dtype=torch.long), s)
    assert s.key.shape[3] == 9 and s.conv.shape[0] == 4


def _cfg(**kw) -> JambaConfig:
    base = dict(vocab_size=50, d_model=16, n_layer=3, layer_kinds=["mamba", "attention", "attention"],
                ffn_kinds=["moe", "moe", "mlp"], n_head=4, n_kv_head=2, head_dim=4, d_ffn=24, n_experts=3, top_k=2,
                d_inner=32, d_state=4, d_conv=4, dt_rank=2)
    return JambaConfig(**{**base, **kw})


@pytest.mark.parametrize("kinds", [["attention"] * 3, ["mamba"] * 3, ["mamba", "attention", "attention"]])
def test_any_layout_runs_parallel_equals_steps(kinds, one_thread):
    """Layouts Jamba's period rule cannot express, and models with only one kind of mixer
    (an empty stack of the other kind, never a placeholder)."""
    torch.manual_seed(0)
    model = Jamba(_cfg(layer_kinds=kinds)).eval()
    s = model.init_state(2)
    assert s.key.shape[0] == kinds.count("attention") and s.conv.shape[0] == kinds.count("mamba")
    lp, sp, ls, ss = factories.parallel_and_steps(model, 50, 12, warm=3)
    torch.testing.assert_close(lp, ls, rtol=1e-5, atol=1e-4)
    assert sp.key.shape[3] == ss.key.shape[3] == 15  # positions keep counting with no attention layer


def test_config_validation():
    with pytest.raises(ValueError, match="layer_kinds must list one of"):
        _cfg(layer_kinds=["mamba", "rnn", "attention"])
    with pytest.raises(ValueError, match="ffn_kinds must list one of"):
        _cfg(ffn_kinds=["moe"])
    with pytest.raises(ValueError, match=r"top_k \(4\) must be in 1..n_experts \(3\)"):
        _cfg(top_k=4)


def test_export_refuses_a_layout_jamba_cannot_express(tmp_path):
    from statecast.families.jamba import hf_config

    cfg = _cfg(layer_kinds=["attention", "attention", "mamba"]).to_unified()
    with pytest.raises(StatecastError, match="attention layout .* has no period/offset form"):
        hf_config(cfg)
    ok = hf_config(_cfg(layer_kinds=["mamba", "attention", "mamba"], ffn_kinds=["mlp", "moe", "mlp"]).to_unified())
    assert (ok["attn_layer_period"], ok["attn_layer_offset"]) == (2, 1)
    assert (ok["expert_layer_period"], ok["expert_layer_offset"]) == (2, 1)


def test_pull_names_missing_extra_and_misshaped_experts(tmp_path):
    from safetensors.torch import load_file, save_file

    src = factories.hf_jamba(tmp_path / "src", seed=22)
    expert = "model.layers.1.feed_forward.experts.{}.up_proj.weight"

    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(src, d)
        sd = load_file(d / "model.safetensors")
        edit(sd)
        save_file(sd, d / "model.safetensors")
        return d

    cases = [
        (broken("missing", lambda sd: sd.pop(expert.format(2))), f"missing tensors {expert.format(2)}"),
        (broken("extra", lambda sd: sd.update({expert.format(4): sd[expert.format(0)].clone()})),
         f"unexpected tensors {expert.format(4)}"),
        (broken("shape", lambda sd: sd.update({expert.format(3): sd[expert.format(3)][:5]})),
         rf"{expert.format(3)} has shape \(5, 32\), expected \(96, 32\)"),
    ]
    for d, message in cases:
        with pytest.raises(StatecastError, match=message.replace(".", r"\.").replace(r"\.\*", ".*")):
            pull(str(d), out=tmp_path / f"out-{d.name}", progress=False)
    cfg = json.loads((src / "config.json").read_text())
    cfg["attn_layer_offset"] = 5
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StatecastError, match=r"attn_layer_offset \(5\) must be smaller than attn_layer_period \(2\)"):
        pull(str(src), out=tmp_path / "out-cfg", progress=False)
    assert not any(p.name.startswith("out-") for p in tmp_path.iterdir())


def test_experts_stream_one_stack_at_a_time(tmp_path, monkeypatch):
    """pull reads each per-expert source tensor exactly once, when its layer's stack is
    written; export reads each stack exactly once and writes its experts from it."""
    from statecast.checkpoints import readers
    from statecast.export import export

    src = factories.hf_jamba(tmp_path / "src", seed=23, shard="40KB")
    reads: list[str] = []
    original = readers.open_tensors

    def recording(files):
        tensors = original(files)
        get = tensors.get

        def traced(key):
            reads.append(key)
            return get(key)

        tensors.get = traced
        return tensors

    monkeypatch.setattr("statecast.convert.pull.open_tensors", recording)
    pull(str(src), out=tmp_path / "u", progress=False)
    experts = [k for k in reads if ".experts." in k]
    assert len(experts) == len(set(experts)) == 2 * 3 * 4  # 2 MoE layers x 3 projections x 4 experts
    first = reads.index("model.layers.1.feed_forward.experts.0.gate_proj.weight")
    assert reads[first : first + 4] == [f"model.layers.1.feed_forward.experts.{j}.gate_proj.weight" for j in range(4)]

    reads.clear()
    monkeypatch.setattr("statecast.checkpoints.layout.open_tensors", recording)
    export(tmp_path / "u", "hf", tmp_path / "hf")
    stacks = [k for k in reads if ".moe." in k and not k.endswith("router.weight")]
    assert len(stacks) == len(set(stacks)) == 2 * 3
