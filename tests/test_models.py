"""Models, losses with sparse labels, checkpoints (safetensors + JSON, hashes, refusal of foreign heads)."""

import json

import numpy as np
import pytest
import torch

from napari_metahistoseg.checkpoints import backbone_sha256, export_head, import_head, load_model, save_model
from napari_metahistoseg.config import ModelConfig
from napari_metahistoseg.data.task import IGNORE
from napari_metahistoseg.losses import hover_loss, seg_loss, soft_dice_loss
from napari_metahistoseg.models import GroupNorm, MetaHistoSegNet, adapted_param_names, group_norm_by_reduction
from napari_metahistoseg.postprocess import hv_targets

TINY = ModelConfig(base_channels=8, depth=3)
HOVER = ["background", "other", "inflammatory", "epithelial", "spindle"]


def tiny(seed=0):
    torch.manual_seed(seed)
    return MetaHistoSegNet(TINY, {"a": 2, "b": 4}, hover_types=5)


def test_forward_shapes_odd_sizes_and_heads():
    m = tiny()
    x = torch.rand(2, 3, 37, 50)
    assert m(x, "a")["seg"].shape == (2, 2, 37, 50)
    assert m(x, "b")["seg"].shape == (2, 4, 37, 50)
    out = m(x, "hover")
    assert out["np"].shape == (2, 2, 37, 50) and out["hv"].shape == (2, 2, 37, 50) and out["nc"].shape[1] == 5
    with pytest.raises(ValueError, match="no head"):
        m(x, "zzz")
    m.add_head("c", 3)
    assert m(x, "c")["seg"].shape[1] == 3
    with pytest.raises(ValueError):
        m.add_head("d", 1)


def test_encode_decode_split_equals_forward():
    """The decoder-only inner loop encodes once and decodes per step: the split must equal the full forward,
    including the padding of odd sizes, and the gradient wrt decoder parameters must be the same."""
    m = tiny().eval()
    x = torch.rand(2, 3, 37, 50)
    enc = m.backbone.encode(x)
    torch.testing.assert_close(m.backbone.decode(*enc), m.backbone(x), rtol=0, atol=0)
    torch.testing.assert_close(m(None, "a", encoded=enc)["seg"], m(x, "a")["seg"], rtol=0, atol=0)
    assert len(enc[0]) == TINY.depth  # decode did not consume the cached skips
    _assert_same_grads(m, x, enc, adapted_param_names(m, "a", "decoder"))


def _assert_same_grads(m, x, encoded, names) -> None:
    """The gradient wrt ``names`` of the full forward of ``x`` equals that of the forward from ``encoded``."""
    params = dict(m.named_parameters())
    grads = []
    for args, kw in (((x, "a"), {}), ((None, "a"), {"encoded": encoded})):
        def loss(sub, args=args, kw=kw):
            return torch.func.functional_call(m, {**params, **sub}, args, kw)["seg"].square().mean()
        grads.append(torch.func.grad(loss)({n: params[n] for n in names}))
    for n in names:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)


def test_partial_decode_equals_forward():
    """``decoder_blocks``: the deep decoder blocks are run once (``decode_head_start``) and only the rest per step;
    same output and same gradient wrt the adapted (last) blocks as the full forward."""
    m = tiny().eval()
    x = torch.rand(2, 3, 37, 50)
    enc = m.backbone.encode(x)
    n = len(m.backbone.decoders)
    for start in range(n + 1):
        part = m.backbone.decode_head_start(*enc, start)
        torch.testing.assert_close(m.backbone.decode(*part), m.backbone(x), rtol=0, atol=0)
    assert len(enc[0]) == TINY.depth  # the cached skips are not consumed
    names = adapted_param_names(m, "a", "decoder", decoder_blocks=1)
    assert {k.split(".")[2] for k in names if k.startswith("backbone.")} == {str(n - 1)}
    assert set(adapted_param_names(m, "a", "decoder", decoder_blocks=n)) == set(adapted_param_names(m, "a", "decoder"))
    with torch.no_grad():
        part = m.backbone.decode_head_start(*enc, n - 1)
    _assert_same_grads(m, x, part, names)


def test_groupnorm_no_batch_dependence():
    m = tiny().eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        full = m(x, "a")["seg"]
        one = m(x[:1], "a")["seg"]
    torch.testing.assert_close(full[:1], one, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_by_reduction_equals_torch(channels_last):
    """The CUDA inference path of GroupNorm (statistics from fp32 reductions, one multiply-add) gives torch's
    values, keeps the memory format, and in bf16 keeps bf16 (autocast would make it fp32) within bf16 rounding."""
    torch.manual_seed(0)
    gn = GroupNorm(4, 16)
    torch.nn.init.normal_(gn.weight)
    torch.nn.init.normal_(gn.bias)
    x = torch.randn(3, 16, 21, 34) * 2.5 + 0.7
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = torch.nn.functional.group_norm(x, 4, gn.weight, gn.bias, gn.eps)
    y = group_norm_by_reduction(x, 4, gn.weight, gn.bias, gn.eps)
    torch.testing.assert_close(y, ref, atol=2e-5, rtol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    yb = group_norm_by_reduction(x.bfloat16(), 4, gn.weight, gn.bias, gn.eps)
    assert yb.dtype == torch.bfloat16
    assert (yb.float() - ref).abs().max() < 0.02 * ref.abs().max()


def test_group_norm_by_reduction_is_exact_on_nearly_constant_groups():
    """A flat tile makes groups whose variance is tiny against their mean: E[x²] - E[x]² summed in fp32 would cancel
    (error ~ 25 * 1e-7 against a variance of 1e-6 here); the fp64 sums match a float64 group norm."""
    torch.manual_seed(1)
    gn = GroupNorm(2, 4)
    x = 5 + 1e-3 * torch.randn(2, 4, 64, 64)
    ref = torch.nn.functional.group_norm(x.double(), 2, gn.weight.double(), gn.bias.double(), gn.eps)
    y = group_norm_by_reduction(x, 2, gn.weight, gn.bias, gn.eps)
    assert ref.abs().max() > 0.1  # not swamped by eps
    torch.testing.assert_close(y.double(), ref, atol=2e-4, rtol=1e-4)


def test_group_norm_fast_path_only_for_cuda_inference(monkeypatch):
    """On the CPU, and wherever gradients flow (training, adaptation), GroupNorm is torch's own; a model with the
    reduction path forced gives the same predictions as with torch's kernel."""
    import napari_metahistoseg.models as models

    calls = []
    real = models.group_norm_by_reduction
    monkeypatch.setattr(models, "group_norm_by_reduction", lambda *a: calls.append(1) or real(*a))
    m = tiny().eval()
    x = torch.rand(2, 3, 40, 48)
    with torch.inference_mode():
        ref = m(x, "b")["seg"]
    assert not calls  # CPU: torch's kernel
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    out = m(x, "b")["seg"]
    assert not calls  # gradients on: torch's kernel
    with torch.inference_mode():
        fast = m(x, "b")["seg"]
    monkeypatch.undo()
    assert calls
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.detach(), ref, atol=1e-6, rtol=1e-6)


def test_adapted_param_names():
    m = tiny()
    head = adapted_param_names(m, "a", "head")
    assert head and all(n.startswith("heads.a.") for n in head)
    dec = adapted_param_names(m, "a", "decoder")
    assert set(head) < set(dec) and any(n.startswith("backbone.decoders") for n in dec)
    allp = adapted_param_names(m, "a", "all")
    assert not any(n.startswith("heads.b.") for n in allp)
    with pytest.raises(ValueError):
        adapted_param_names(m, "a", "nope")


def test_seg_loss_ignores_unknown_pixels():
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    t = torch.full((1, 4, 4), IGNORE)
    assert float(seg_loss(logits, t).detach()) == 0.0
    t[0, 0, 0] = 1
    g = torch.autograd.grad(seg_loss(logits, t, balance=True), logits)[0]
    assert g[0, :, 1:, :].abs().sum() == 0 and g[0, :, 0, 0].abs().sum() > 0
    perfect = torch.zeros(1, 2, 4, 4)
    perfect[0, 1] = 50
    assert float(soft_dice_loss(perfect, torch.ones(1, 4, 4, dtype=torch.long))) < 1e-3


def test_hover_loss_zero_at_target():
    inst = np.zeros((32, 32), np.uint32)
    inst[4:12, 4:14] = 1
    inst[16:28, 10:20] = 2
    hv = torch.from_numpy(hv_targets(inst))[None]
    npt = torch.from_numpy((inst > 0).astype(np.int64))[None]
    logits = torch.stack([(npt == 0).float(), (npt == 1).float()], 1) * 40
    terms = hover_loss({"np": logits, "hv": hv.clone()}, npt, hv)
    assert float(terms["hv_mse"]) < 1e-8 and float(terms["hv_msge"]) < 1e-8 and float(terms["np"]) < 1e-2


def test_hv_targets_range_and_sign():
    inst = np.zeros((20, 20), np.uint32)
    inst[5:15, 2:18] = 7
    hv = hv_targets(inst)
    assert hv.min() == -1 and hv.max() == 1
    assert (hv[0][10, 2] < 0) and (hv[0][10, 17] > 0) and (hv[1][5, 10] < 0) and (hv[1][14, 10] > 0)
    assert np.all(hv[:, inst == 0] == 0)


def test_checkpoint_roundtrip_hash_and_tamper(tmp_path):
    m = tiny()
    classes = {"a": ["bg", "x"], "b": ["bg", "p", "q", "r"], "hover": HOVER}
    save_model(m, tmp_path / "ck", head_classes=classes, inner_lrs={"heads.a.net.0.weight": torch.tensor(0.1)})
    m2, desc, lrs = load_model(tmp_path / "ck")
    assert desc["backbone_sha256"] == backbone_sha256(m) == backbone_sha256(m2)
    assert abs(float(lrs["heads.a.net.0.weight"]) - 0.1) < 1e-7
    x = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x, "b")["seg"], m2(x, "b")["seg"])
    raw = (tmp_path / "ck.safetensors").read_bytes()
    (tmp_path / "ck.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="ck.safetensors"):
        load_model(tmp_path / "ck")
    (tmp_path / "ck.safetensors").write_bytes(raw)
    desc["model"]["base_channels"] = 16
    desc.pop("weights_sha256")
    (tmp_path / "ck.json").write_text(json.dumps(desc))
    with pytest.raises(ValueError, match="do not match"):
        load_model(tmp_path / "ck")
    (tmp_path / "ck.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(tmp_path / "ck")


def test_exported_head_refused_for_other_backbone_and_tamper(tmp_path):
    state = {"net.0.weight": torch.ones(2, 8, 1, 1)}
    w, j = export_head(tmp_path / "h", state, backbone_sha="a" * 64, classes=["bg", "x"], provenance={"k": 1})
    assert w.name == "h.mhshead.safetensors" and j.name == "h.mhshead.json"
    st, desc = import_head(j, backbone_sha="a" * 64)
    assert torch.equal(st["net.0.weight"], state["net.0.weight"]) and desc["provenance"] == {"k": 1}
    with pytest.raises(ValueError, match="backbone"):
        import_head(j, backbone_sha="b" * 64)
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        import_head(j)


def test_no_pickle_loading_anywhere():
    import pathlib

    src = pathlib.Path(__file__).resolve().parents[1] / "napari_metahistoseg"
    for p in src.rglob("*.py"):
        text = p.read_text()
        assert "pickle.load" not in text, p
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{p}: {line}"
