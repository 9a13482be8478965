"""The model: parameter counts against the protocol, identity at init, the wrapper against diffusers,
and the method contract checks."""
import json

import pytest
import torch
from torch import nn

import conditioning
import custom_train
from custom_train import HarnessError

# docs/protocol.md, "Total parameters (UNet + class embedding + conditioners)".
PROTOCOL_PARAMS = {
    ("small", "concat-film"): 8_954_627, ("small", "cross-attn"): 9_730_819, ("small", "adanorm"): 9_746_179,
    ("medium", "concat-film"): 35_751_427, ("medium", "cross-attn"): 38_843_907, ("medium", "adanorm"): 38_907_395,
    ("large", "concat-film"): 142_871_555, ("large", "cross-attn"): 155_216_899, ("large", "adanorm"): 155_474_947,
}
PROTOCOL_BUDGET = {"small": 10_217_359, "medium": 40_786_102, "large": 162_977_743}
PROTOCOL_UNET = {"small": 8_952_067, "medium": 35_746_307, "large": 142_861_315}


@pytest.mark.parametrize("scale,method", list(PROTOCOL_PARAMS))
def test_count_params_matches_protocol(scale, method, capsys):
    custom_train.main(["--scale", scale, "--method", method, "--count-params"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"scale": scale, "method": method, "params": PROTOCOL_PARAMS[scale, method],
                       "budget": PROTOCOL_BUDGET[scale], "within_budget": True}


@pytest.mark.parametrize("scale", ["small", "medium", "large"])
def test_unet_alone_matches_protocol(scale):
    with torch.device("meta"):
        assert custom_train.count_params(custom_train.build_unet(scale)) == PROTOCOL_UNET[scale]


def test_shared_utilities_keep_32_groups_at_real_scales():
    for channels in (64, 128, 256, 512):
        assert conditioning.num_groups(channels) == 32
        assert conditioning.CrossAttentionLayer(channels, 256).norm.num_groups == 32
    assert conditioning.num_groups(16) == 16  # tiny adapts


def small_batch(scale="tiny", batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randint(0, 10, (batch,), generator=g))


@pytest.mark.parametrize("method", list(conditioning.METHODS))
def test_every_method_runs_at_tiny(method):
    torch.manual_seed(0)
    model = custom_train.build_model("tiny", method)
    custom_train.check_method_contract(model, method, torch.device("cpu"))
    x, t, y = small_batch()
    out = model(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()  # and it trains: every parameter that gets a gradient has a finite one
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("method", ["cross-attn", "adanorm"])
def test_zero_init_methods_start_as_the_unconditional_unet(method):
    torch.manual_seed(0)
    model = custom_train.build_model("tiny", method).eval()
    x, t, y = small_batch()
    with torch.no_grad():
        wrapped = model(x, t, y)
        bare = model.unet(x, t).sample  # diffusers' own forward, time path alone
        other_labels = model(x, t, (y + 1) % 10)
    assert torch.equal(wrapped, bare)
    assert torch.equal(wrapped, other_labels)


def test_concat_film_equals_diffusers_class_conditioning():
    """concat-film is what diffusers does with num_class_embeds: the wrapper must reproduce it."""
    torch.manual_seed(0)
    model = custom_train.build_model("tiny", "concat-film").eval()
    reference = custom_train.build_unet("tiny")
    reference.register_to_config(num_class_embeds=10)
    reference.class_embedding = nn.Embedding(10, model.cond_dim)
    reference.load_state_dict({**model.unet.state_dict(), "class_embedding.weight": model.class_embedding.weight})
    x, t, y = small_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference(x, t, class_labels=y).sample, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(x, t, y), model(x, t, (y + 1) % 10))  # the label matters


def test_scalar_timestep_is_broadcast():
    torch.manual_seed(0)
    model = custom_train.build_model("tiny", "adanorm").eval()
    x, _, y = small_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor(500), y), model(x, torch.full((3,), 500), y))


class WrongShapeConditioner(nn.Module):
    def __init__(self, channels, cond_dim):
        super().__init__()

    def forward(self, h, class_emb):
        return h[:, :1]


class RaisingConditioner(WrongShapeConditioner):
    def forward(self, h, class_emb):
        raise RuntimeError("boom")


class HugeConditioner(nn.Module):
    def __init__(self, channels, cond_dim):
        super().__init__()
        self.proj = nn.Linear(cond_dim, 4096)

    def forward(self, h, class_emb):
        return h


@pytest.mark.parametrize("method,message", [
    (conditioning.Method(lambda t, c: torch.cat([t, c], 1), conditioning.NoConditioner, "bad time path"),
     "method 'broken': prepare_conditioning must return [B, D] = [2, 64], got (2, 128)"),
    (conditioning.Method(conditioning.time_only, WrongShapeConditioner, "bad conditioner"),
     "method 'broken': ClassConditioner(16, 64) at down[0] must return its input's shape (2, 16, 8, 8), got (2, 1, 8, 8)"),
    (conditioning.Method(conditioning.time_only, RaisingConditioner, "raising conditioner"),
     "method 'broken': ClassConditioner(16, 64) at down[0] raised RuntimeError: boom"),
])
def test_contract_violations_are_one_clear_line(monkeypatch, tmp_path, method, message):
    monkeypatch.setitem(conditioning.METHODS, "broken", method)
    with pytest.raises(HarnessError) as e:
        custom_train.main(["--scale", "tiny", "--method", "broken", "--out-dir", str(tmp_path), "--fid", "off"])
    assert str(e.value) == message
    assert not (tmp_path / "tiny-broken-s42").exists()  # refused before anything was written


def test_over_budget_method_is_refused(monkeypatch, tmp_path):
    monkeypatch.setitem(conditioning.METHODS, "huge", conditioning.Method(conditioning.time_only, HugeConditioner, ""))
    with pytest.raises(HarnessError, match=r"method 'huge' has [\d,]+ parameters at scale tiny, over the budget of "
                                           r"646,399 .*--ignore-budget"):
        custom_train.main(["--scale", "tiny", "--method", "huge", "--out-dir", str(tmp_path), "--fid", "off"])


def test_unknown_method_names_the_choices():
    with pytest.raises(HarnessError, match="unknown --method 'nope'; choose one of: custom, concat-film"):
        custom_train.main(["--method", "nope", "--count-params"])


def test_list_methods_prints_every_method(capsys):
    custom_train.main(["--list-methods"])
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == list(conditioning.METHODS)


@pytest.mark.parametrize("method", [m for m in conditioning.METHODS if m not in ("custom",) + conditioning.BASELINES])
@pytest.mark.parametrize("scale", ["small", "medium", "large"])
def test_published_and_candidate_methods_fit_the_budget(method, scale):
    params, budget = custom_train.params_and_budget(scale, method)
    assert params <= budget


@pytest.mark.parametrize("method,starts_as", [
    ("gn-film-branch", None), ("class-film", None),                       # exactly the unconditional UNet
    ("concat-film+cross-attn", "concat-film"), ("concat-class-film", "concat-film"),  # exactly concat-film
    ("concat-film+class-tokens", "concat-film"), ("concat-film+class-tokens+gain", "concat-film"),
    ("concat-film+joint-attn+gain", "concat-film"), ("concat-film+content-gate", "concat-film"),
])
def test_post_block_modules_start_as_the_identity(method, starts_as):
    torch.manual_seed(0)
    model = custom_train.build_model("tiny", method).eval()
    x, t, y = small_batch()
    with torch.no_grad():
        if starts_as is None:
            expected = model.unet(x, t).sample
        else:
            reference = custom_train.build_model("tiny", starts_as).eval()
            reference.unet.load_state_dict(model.unet.state_dict())
            reference.class_embedding.load_state_dict(model.class_embedding.state_dict())
            expected = reference(x, t, y)
        assert torch.equal(model(x, t, y), expected)


def test_class_film_gets_a_gradient_at_init_where_gated_branches_do_not():
    """The reason for ClassFiLM: its modulation is trained from step 1, while the zero gate / zero
    output conv of AdaLN and the GroupNorm branch leave their modulation without gradient at init."""
    def modulation_grad(method, name):
        torch.manual_seed(0)
        model = custom_train.build_model("tiny", method)
        x, t, y = small_batch()
        model(x, t, y).square().mean().backward()
        return model.down_cond[0].get_parameter(name).grad.abs().sum().item()

    assert modulation_grad("class-film", "film.1.weight") > 0
    assert modulation_grad("gn-film-branch", "film.1.weight") == 0
    assert modulation_grad("adanorm", "modulation.1.weight") > 0  # only the gate rows ...
    torch.manual_seed(0)
    model = custom_train.build_model("tiny", "adanorm")
    x, t, y = small_batch()
    model(x, t, y).square().mean().backward()
    grad = model.down_cond[0].modulation[1].weight.grad
    assert grad[:2 * 16].abs().sum() == 0 and grad[2 * 16:].abs().sum() > 0  # ... scale and shift get none


def test_rms_concat_matches_the_time_scale():
    time_emb, class_emb = torch.randn(4, 64) * 0.1, torch.randn(4, 64) * 5
    emb = conditioning.add_unit_rms_class_to_time(time_emb, class_emb)
    added = emb - time_emb
    torch.testing.assert_close(added.pow(2).mean(1), time_emb.pow(2).mean(1))
    torch.testing.assert_close(torch.nn.functional.normalize(added, dim=1),
                               torch.nn.functional.normalize(class_emb, dim=1))


def test_several_class_tokens_make_the_class_injection_depend_on_the_position():
    """With one token the softmax is 1: cross-attention adds the same vector at every position and
    its query gets no gradient. With several class tokens neither is true."""
    def added_and_query_grad(layer):
        torch.manual_seed(0)
        torch.nn.init.normal_(layer.to_out.weight)  # open the zero-initialised output, as training does
        h, class_emb = torch.randn(2, 32, 4, 4), torch.randn(2, 64)
        added = layer(h, class_emb) - h
        added.square().sum().backward()
        # the query's gradient relative to the value's (one token: zero up to float rounding)
        return added, layer.to_q.weight.grad.abs().sum().item() / layer.to_v.weight.grad.abs().sum().item()

    torch.manual_seed(0)
    added, query_grad = added_and_query_grad(conditioning.CrossAttentionLayer(32, 64))
    torch.testing.assert_close(added, added[:, :, :1, :1].expand_as(added))  # one vector per sample
    assert query_grad < 1e-6
    torch.manual_seed(0)
    added, query_grad = added_and_query_grad(conditioning.ClassTokenCrossAttention(32, 64))
    assert (added - added[:, :, :1, :1]).abs().amax() > 1e-3  # differs across positions
    assert query_grad > 1e-3


def test_joint_attention_lets_each_position_weigh_the_class_token(monkeypatch):
    """In one softmax with the positions, the class token's share differs from position to position
    (one-token cross-attention gives it weight 1 everywhere), and changing the class changes the
    output through the token."""
    torch.manual_seed(0)
    layer = conditioning.JointAttentionWithGain(32, 64)
    torch.nn.init.normal_(layer.to_out.weight)  # open the zero-initialised output, as training does
    h, class_emb = torch.randn(2, 32, 4, 4), torch.randn(2, 64)
    weights = {}
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        weights["class"] = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)[..., -1]
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    out = layer(h, class_emb)
    class_share = weights["class"]  # [B, heads, HW]
    assert class_share.shape == (2, 4, 16)
    assert (class_share.amax(-1) - class_share.amin(-1)).min() > 1e-3
    assert (layer(h, class_emb.flip(0)) - out).abs().amax() > 1e-3


def test_content_gate_depends_on_class_and_content():
    torch.manual_seed(0)
    gate = conditioning.ClassContentGate(32, 64)
    torch.nn.init.normal_(gate.excite.weight, std=0.1)  # open the zero-initialised excitation
    h, class_emb = torch.randn(2, 32, 4, 4), torch.randn(2, 64)
    ratio = gate(h, class_emb) / h  # the per-channel gain, the same at every position
    torch.testing.assert_close(ratio, ratio[:, :, :1, :1].expand_as(ratio))
    assert ((ratio > 0) & (ratio < 2)).all()
    other_class = gate(h, class_emb.flip(0)) / h
    h2 = torch.randn_like(h)  # other content (not an affine map of h: GroupNorm would undo it)
    other_content = gate(h2, class_emb) / h2
    assert (other_class - ratio).abs().amax() > 1e-3 and (other_content - ratio).abs().amax() > 1e-3
