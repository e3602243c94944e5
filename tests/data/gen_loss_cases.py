"""Reference cases of the MMDetection 3.3 loss classes that mmdet_cases.json does not cover:
loss_cases.json (described in loss_cases.md beside this file).

GaussianFocalLoss, EIoULoss, SIoULoss, BoundedIoULoss, KnowledgeDistillationKLDivLoss,
SeesawLoss, EQLV2Loss, MSELoss, L2Loss, MarginL2Loss, DiceLoss, FocalCustomLoss,
CrossEntropyCustomLoss, AssociativeEmbeddingLoss, TripletLoss, MultiPosCrossEntropyLoss and
DDQAuxLoss, plus 7 three-call sequences of GHMR and GHMC with momentum (float64 and float32,
0/1 and fractional label weights): their float32 acc_sum state whatever the inputs' dtype.

Computed by the real, unmodified MMDetection 3.3.0 from its wheel, imported as for
point_cases.json (gen_point_cases.py): mmcv from mmcv-lite 2.1.0 with mmcv.ops served by stubs
that raise if called; mmdet.models and mmdet.models.losses as bare packages (their __init__
files do not run), then mmdet.models.task_modules and mmdet.models.utils (for DDQAuxLoss's
assigner, sampler and multi_apply) and the individual loss modules, all unmodified; every loss
is built with mmdet.registry.MODELS.build(config) except DDQAuxLoss, which MMDetection does not
register (its MODELS.build is recorded as an expected error, and it is constructed directly).
float64 on CPU, one thread; grad_<x> = torch.autograd.grad(sum of all output tensors, x).

    python3 -m venv /tmp/mmvenv
    # torch 2.11.0: from PyPI (pip install torch==2.11.0), or point the venv at an existing
    # torch 2.11.0 install with a .pth file, as was done for the committed file:
    #   echo ~/.cache/tch-detloss/torch-2.11.0-nvcc-13.0.88/lib/python3.11/site-packages \
    #       > /tmp/mmvenv/lib/python3.11/site-packages/torch_env.pth
    /tmp/mmvenv/bin/pip install --no-deps mmdet==3.3.0 mmcv-lite==2.1.0 mmengine==0.10.7
    /tmp/mmvenv/bin/pip install numpy scipy addict pyyaml rich termcolor yapf \
        opencv-python-headless matplotlib shapely pycocotools terminaltables six tqdm
    /tmp/mmvenv/bin/python tests/data/gen_loss_cases.py tests/data/loss_cases.json
"""
import importlib
import json
import math
import os
import platform
import sys
import tempfile
import warnings

import torch

torch.set_num_threads(1)
warnings.simplefilter("ignore")

from mmdet_import import CALLED, import_mmdet  # noqa: E402  (beside this script)

mmdet = import_mmdet(["mmdet.models", "mmdet.models.losses"])
LOSS_MODULES = ["utils", "accuracy", "gaussian_focal_loss", "iou_loss", "kd_loss", "seesaw_loss",
                "eqlv2_loss", "mse_loss", "l2_loss", "margin_loss", "dice_loss", "focal_loss",
                "cross_entropy_loss", "ae_loss", "triplet_loss", "multipos_cross_entropy_loss",
                "gfocal_loss", "ghm_loss", "ddq_detr_aux_loss"]
MOD = {m: importlib.import_module("mmdet.models.losses." + m) for m in LOSS_MODULES}
from mmdet.registry import MODELS  # noqa: E402

F64, F32, I64 = torch.float64, torch.float32, torch.int64
EPS32 = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------- encoding
def enc(t):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(t)
    t = t.detach().cpu()
    data = t.flatten().tolist()
    if t.dtype.is_floating_point:
        data = [x if math.isfinite(x) else ("nan" if x != x else ("inf" if x > 0 else "-inf")) for x in data]
    elif t.dtype == torch.bool:
        data = [int(x) for x in data]
    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "data": data}


def enc_all(d):
    return {k: enc(v) for k, v in d.items()}


class Ref:
    """An argument that is one of the case's input tensors (optionally transformed)."""

    def __init__(self, name, text=None, fn=None):
        self.name, self.text, self.fn = name, text or name, fn


def lit(v):
    return repr(v)


def python_call(method, pos, kw):
    parts = [p.text if isinstance(p, Ref) else lit(p) for p in pos]
    parts += [f"{k}={v.text if isinstance(v, Ref) else lit(v)}" for k, v in kw.items()]
    return f"loss{'.' + method if method else ''}({', '.join(parts)})"


def call_record(pos, kw, method=None, extra=None):
    rec = {}
    for k in ["reduction_override", "avg_factor", "weight"]:
        if k in kw:
            v = kw[k]
            rec[k] = f"inputs.{v.name}" if isinstance(v, Ref) else v
    for k, v in kw.items():
        if k not in rec:
            rec[k] = f"inputs.{v.name}" if isinstance(v, Ref) else v
    rec["positional"] = [(p.text if isinstance(p, ListRef) else f"inputs.{p.name}") if isinstance(p, Ref) else p
                         for p in pos]
    rec["python"] = python_call(method, pos, kw)
    if extra:
        rec.update(extra)
    return rec


def materialise(inputs, grad_of):
    """Fresh copies of the inputs (MMDetection mutates some), leaves with grad where asked."""
    ins = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            c = v.detach().clone()
            if k in grad_of and c.is_floating_point():
                c.requires_grad_(True)
            ins[k] = c
        else:
            ins[k] = v
    return ins


class ListRef(Ref):
    """A list argument [<base>.img0, <base>.img1] built from per-image inputs (DDQAuxLoss.loss)."""

    def __init__(self, base):
        super().__init__(base, f"[{base}.img0, {base}.img1]")


def resolve(a, ins):
    if isinstance(a, ListRef):
        return [ins[f"{a.name}.img0"], ins[f"{a.name}.img1"]]
    if isinstance(a, Ref):
        v = ins[a.name]
        return a.fn(v) if a.fn else v
    return a


def flatten_result(res, prefix="loss"):
    """An output: one tensor as 'loss'; a dict/tuple as one entry per element."""
    if isinstance(res, dict):
        out = {}
        for k, v in res.items():
            if isinstance(v, (list, tuple)):
                for i, x in enumerate(v):
                    out[f"{k}.img{i}"] = x
            else:
                out[k] = v
        return out
    if isinstance(res, (tuple, list)):
        return {f"{prefix}.{i}": v for i, v in enumerate(res)}
    return {prefix: res}


def evaluate(loss, inputs, pos, kw, grad_of=("pred",), method=None, extras=None, per_entry_grads=False,
             after=None, out_names=None):
    ins = materialise(inputs, grad_of)
    fn = getattr(loss, method) if method else loss
    res = fn(*[resolve(a, ins) for a in pos], **{k: resolve(v, ins) for k, v in kw.items()})
    outs = flatten_result(res)
    if out_names:
        assert len(out_names) == len(outs)
        outs = dict(zip(out_names, outs.values()))
    outs = {k: (v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=F64)) for k, v in outs.items()}
    leaves = [ins[g] for g in grad_of if isinstance(ins.get(g), torch.Tensor) and ins[g].requires_grad]
    names = [g for g in grad_of if isinstance(ins.get(g), torch.Tensor) and ins[g].requires_grad]
    result = dict(outs)
    total = sum(v.sum() for v in outs.values() if v.requires_grad)
    grad_error = None
    if leaves:
        try:
            if isinstance(total, torch.Tensor) and total.requires_grad:
                grads = torch.autograd.grad(total, leaves, allow_unused=True, retain_graph=per_entry_grads)
            else:
                grads = [None] * len(leaves)
        except RuntimeError as e:  # MMDetection's backward itself fails (recorded, see grad_error)
            grad_error = {"type": type(e).__name__, "message": str(e)}
            per_entry_grads = False
            grads = []
        for n, l, gr in zip(names, leaves, grads):
            result[f"grad_{n}"] = torch.zeros_like(l) if gr is None else gr
        if per_entry_grads and len(outs) > 1:
            for k, v in outs.items():
                if not v.requires_grad:
                    continue
                gs = torch.autograd.grad(v.sum(), leaves, allow_unused=True, retain_graph=True)
                for n, l, gr in zip(names, leaves, gs):
                    result[f"grad_{n}.{k}"] = torch.zeros_like(l) if gr is None else gr
    if after:
        result.update(after(ins))
    if extras:
        with torch.no_grad():
            result.update(extras(loss))
    if grad_error:
        result["__grad_error__"] = grad_error
    return result


def split_grad_error(outs):
    err = outs.pop("__grad_error__", None)
    return outs, err


CASES, ERRORS = [], []


def used_inputs(inputs, pos, kw):
    """The inputs a call references (plus explicit None entries, recorded as null)."""
    names = set()
    for a in list(pos) + list(kw.values()):
        if isinstance(a, ListRef):
            names |= {f"{a.name}.img0", f"{a.name}.img1"}
        elif isinstance(a, Ref):
            names.add(a.name)
    return {k: v for k, v in inputs.items() if k in names or v is None}


def build(config):
    return MODELS.build(dict(config))


def add(name, config, inputs, pos, kw=None, grad_of=("pred",), state=None, method=None, extras=None,
        extras_python=None, per_entry_grads=False, after=None, loss_name=None, builder=None, note=None,
        out_names=None):
    kw = kw or {}
    loss = (builder or build)(config)
    outs, gerr = split_grad_error(
        evaluate(loss, inputs, pos, kw, grad_of, method, extras, per_entry_grads, after, out_names))
    c = {"name": name, "loss": loss_name or config["type"], "config": config,
         "call": call_record(pos, kw, method, {"extras": extras_python} if extras_python else None),
         "inputs": enc_all(used_inputs(inputs, pos, kw)), "outputs": enc_all(outs)}
    if gerr:
        c["grad_error"] = gerr
    if state:
        c["state_after"] = enc_all({k: getattr(loss, k) for k in state})
    if note:
        c["note"] = note
    CASES.append(c)
    return c


def add_sequence(name, config, steps, pos, kw=None, grad_of=("pred",), state=(), loss_name=None,
                 builder=None, note=None, extras=None, extras_python=None):
    kw = kw or {}
    loss = (builder or build)(config)
    seq = []
    for inputs in steps:
        outs, gerr = split_grad_error(evaluate(loss, inputs, pos, kw, grad_of, None, extras))
        assert gerr is None, gerr
        seq.append({"inputs": enc_all(used_inputs(inputs, pos, kw)), "outputs": enc_all(outs),
                    "state_after": enc_all({k: getattr(loss, k).clone() for k in state})})
    c = {"name": name, "loss": loss_name or config["type"], "config": config,
         "call": call_record(pos, kw, None, {"extras": extras_python} if extras_python else None),
         "inputs": seq[0]["inputs"], "outputs": seq[0]["outputs"], "sequence": seq}
    if note:
        c["note"] = note
    CASES.append(c)
    return c


def add_error(name, config, inputs, pos, kw=None, grad_of=("pred",), method=None, loss_name=None,
              builder=None, at_build=False):
    kw = kw or {}
    try:
        loss = (builder or build)(config)
        if not at_build:
            evaluate(loss, inputs, pos, kw, grad_of, method)
    except Exception as e:  # noqa: BLE001  (what MMDetection raises is the record)
        ERRORS.append({"name": name, "loss": loss_name or config["type"], "config": config,
                       "call": {"python": "MODELS.build(config)"} if at_build else call_record(pos, kw, method),
                       "inputs": {} if at_build else enc_all(used_inputs(inputs, pos, kw)),
                       "error": {"type": type(e).__name__, "message": str(e)}})
        return
    raise SystemExit(f"expected error case {name} did not raise")


# ---------------------------------------------------------------- inputs
GEN = torch.Generator().manual_seed(20240303)


def randn(*shape, scale=1.0, dtype=F64):
    return (torch.randn(*shape, generator=GEN, dtype=F64) * scale).to(dtype)


def rand(*shape, lo=0.0, hi=1.0, dtype=F64):
    return (torch.rand(*shape, generator=GEN, dtype=F64) * (hi - lo) + lo).to(dtype)


def randint(lo, hi, *shape):
    return torch.randint(lo, hi, shape, generator=GEN, dtype=I64)


def box_pair(n, dtype=F64):
    """pred/target boxes (x1, y1, x2, y2): overlapping, plus an identical and a disjoint pair."""
    xy = rand(n, 2, lo=0, hi=20)
    wh = rand(n, 2, lo=2, hi=15)
    target = torch.cat([xy, xy + wh], 1)
    pred = target + randn(n, 4, scale=2.0)
    pred[:, 2:] = torch.max(pred[:, 2:], pred[:, :2] + 0.5)
    pred[0] = target[0]  # identical
    pred[1] = torch.tensor([40.0, 40.0, 45.0, 47.0], dtype=F64)  # disjoint
    target[1] = torch.tensor([2.0, 3.0, 9.0, 8.0], dtype=F64)
    return pred.to(dtype), target.to(dtype)


def gaussian_heatmap(n, c, dtype=F64):
    t = rand(n, c, lo=0, hi=0.95)
    t[torch.arange(n) % 3 == 0, 0] = 1.0
    t[2, 3 % c] = 1.0
    t[4, 1 % c] = 0.0
    return t.to(dtype)


# ================================================================ GaussianFocalLoss
GFL_DEF = {"type": "GaussianFocalLoss"}
GFL_CUSTOM = {"type": "GaussianFocalLoss", "alpha": 3.0, "gamma": 2.0, "pos_weight": 2.0, "neg_weight": 0.5,
              "loss_weight": 0.7}
p, t, w = rand(6, 5, lo=0.02, hi=0.98), gaussian_heatmap(6, 5), rand(6, 5)
I = {"pred": p, "target": t, "weight": None}
add("gaussian_focal_default_mean", GFL_DEF, I, [Ref("pred"), Ref("target")])
add("gaussian_focal_custom_none_weight", GFL_CUSTOM, {"pred": p, "target": t, "weight": w},
    [Ref("pred"), Ref("target")], {"weight": Ref("weight"), "reduction_override": "none"})
add("gaussian_focal_default_sum_weight_col", GFL_DEF, {"pred": p, "target": t, "weight": w[:, :1].clone()},
    [Ref("pred"), Ref("target")], {"weight": Ref("weight"), "reduction_override": "sum"})
add("gaussian_focal_custom_mean_avg_factor", GFL_CUSTOM, I, [Ref("pred"), Ref("target")], {"avg_factor": 3.5})
add("gaussian_focal_default_float32", GFL_DEF, {"pred": p.float(), "target": t.float(), "weight": None},
    [Ref("pred"), Ref("target")], {"avg_factor": 4.0})
p8, t8 = rand(8, 4, lo=0.02, hi=0.98), gaussian_heatmap(8, 4)
PI = {"pred": p8, "target": t8, "pos_inds": torch.tensor([1, 4, 6]), "pos_labels": torch.tensor([0, 3, 2]),
      "weight": rand(8, 4)}
add("gaussian_focal_pos_inds_mean_weight_ignored", GFL_CUSTOM, PI,
    [Ref("pred"), Ref("target")], {"pos_inds": Ref("pos_inds"), "pos_labels": Ref("pos_labels"),
                                   "weight": Ref("weight")})
add("gaussian_focal_pos_inds_mean_avg_factor", GFL_DEF, PI,
    [Ref("pred"), Ref("target")], {"pos_inds": Ref("pos_inds"), "pos_labels": Ref("pos_labels"), "avg_factor": 3.0})
add("gaussian_focal_pos_inds_sum", GFL_CUSTOM, PI,
    [Ref("pred"), Ref("target")], {"pos_inds": Ref("pos_inds"), "pos_labels": Ref("pos_labels"),
                                   "reduction_override": "sum"})
PI1 = dict(PI, pos_inds=torch.tensor([5]), pos_labels=torch.tensor([1]))
add("gaussian_focal_pos_inds_one_none_broadcast", GFL_CUSTOM, PI1,
    [Ref("pred"), Ref("target")], {"pos_inds": Ref("pos_inds"), "pos_labels": Ref("pos_labels"),
                                   "reduction_override": "none", "avg_factor": 2.0})
add_error("gaussian_focal_pos_inds_none_shape_mismatch", GFL_DEF, PI, [Ref("pred"), Ref("target")],
          {"pos_inds": Ref("pos_inds"), "pos_labels": Ref("pos_labels"), "reduction_override": "none"})
add_error("gaussian_focal_sum_avg_factor", GFL_DEF, I, [Ref("pred"), Ref("target")],
          {"reduction_override": "sum", "avg_factor": 2.0})
add_error("gaussian_focal_pos_inds_without_pos_labels", GFL_DEF, PI, [Ref("pred"), Ref("target")],
          {"pos_inds": Ref("pos_inds")})

# ================================================================ EIoU / SIoU / BoundedIoU
bp, bt = box_pair(8)
bw = rand(8)
bw4 = rand(8, 4)
for ty, extra_cfg in [("EIoULoss", {"smooth_point": 0.3}), ("SIoULoss", {"neg_gamma": True})]:
    tag = ty[:4].lower()
    D = {"type": ty}
    C2 = dict({"type": ty, "eps": 1e-7, "loss_weight": 3.0}, **extra_cfg)
    add(f"{tag}_default_mean", D, {"pred": bp, "target": bt, "weight": None}, [Ref("pred"), Ref("target")])
    add(f"{tag}_custom_none_weightN", C2, {"pred": bp, "target": bt, "weight": bw}, [Ref("pred"), Ref("target")],
        {"weight": Ref("weight"), "reduction_override": "none"})
    add(f"{tag}_default_sum_weightN4_mean_last", D, {"pred": bp, "target": bt, "weight": bw4},
        [Ref("pred"), Ref("target")], {"weight": Ref("weight"), "reduction_override": "sum"})
    add(f"{tag}_custom_mean_avg_factor", C2, {"pred": bp, "target": bt, "weight": bw}, [Ref("pred"), Ref("target")],
        {"weight": Ref("weight"), "avg_factor": 5.5})
    add(f"{tag}_zero_weight_shortcut_none", D, {"pred": bp, "target": bt, "weight": torch.zeros(8, dtype=F64)},
        [Ref("pred"), Ref("target")], {"weight": Ref("weight"), "reduction_override": "none"})
    add(f"{tag}_default_float32", D, {"pred": bp.float(), "target": bt.float(), "weight": bw.float()},
        [Ref("pred"), Ref("target")], {"weight": Ref("weight")})
    add_error(f"{tag}_sum_avg_factor", D, {"pred": bp, "target": bt}, [Ref("pred"), Ref("target")],
              {"reduction_override": "sum", "avg_factor": 2.0})
    add_error(f"{tag}_weight_N1_assert", D, {"pred": bp, "target": bt, "weight": bw[:, None].clone()},
              [Ref("pred"), Ref("target")], {"weight": Ref("weight")})
# SIoU with the eiou smooth defaults (neg_gamma False) also gets a non-default eps/loss_weight case
add("siou_eps1e-7_lw3_none", {"type": "SIoULoss", "eps": 1e-7, "loss_weight": 3.0},
    {"pred": bp, "target": bt, "weight": None}, [Ref("pred"), Ref("target")], {"reduction_override": "none"})
add("eiou_smooth_point_default_none", {"type": "EIoULoss"}, {"pred": bp, "target": bt, "weight": None},
    [Ref("pred"), Ref("target")], {"reduction_override": "none"})

BD = {"type": "BoundedIoULoss"}
BC = {"type": "BoundedIoULoss", "beta": 0.5, "eps": 1e-2, "loss_weight": 2.0}
add("bounded_iou_default_mean", BD, {"pred": bp, "target": bt, "weight": None}, [Ref("pred"), Ref("target")])
add("bounded_iou_custom_none", BC, {"pred": bp, "target": bt, "weight": None}, [Ref("pred"), Ref("target")],
    {"reduction_override": "none"})
add("bounded_iou_default_sum_weightN4", BD, {"pred": bp, "target": bt, "weight": bw4}, [Ref("pred"), Ref("target")],
    {"weight": Ref("weight"), "reduction_override": "sum"})
add("bounded_iou_custom_mean_avg_factor_weightN4", BC, {"pred": bp, "target": bt, "weight": bw4},
    [Ref("pred"), Ref("target")], {"weight": Ref("weight"), "avg_factor": 6.0})
add("bounded_iou_zero_weightN_shortcut", BD, {"pred": bp, "target": bt, "weight": torch.zeros(8, dtype=F64)},
    [Ref("pred"), Ref("target")], {"weight": Ref("weight"), "reduction_override": "none"})
add("bounded_iou_default_float32", BD, {"pred": bp.float(), "target": bt.float(), "weight": None},
    [Ref("pred"), Ref("target")])
add_error("bounded_iou_weightN_broadcast", BD, {"pred": bp, "target": bt, "weight": bw},
          [Ref("pred"), Ref("target")], {"weight": Ref("weight")})
add_error("bounded_iou_sum_avg_factor", BD, {"pred": bp, "target": bt}, [Ref("pred"), Ref("target")],
          {"reduction_override": "sum", "avg_factor": 2.0})

# ================================================================ KnowledgeDistillationKLDivLoss
kp, ks, kw_ = randn(7, 5, scale=3.0), randn(7, 5, scale=3.0), rand(7)
KD = {"type": "KnowledgeDistillationKLDivLoss"}
add("kd_default_T10_mean", KD, {"pred": kp, "target": ks, "weight": None}, [Ref("pred"), Ref("target")],
    grad_of=("pred", "target"))
add("kd_T1_none", {"type": "KnowledgeDistillationKLDivLoss", "T": 1}, {"pred": kp, "target": ks, "weight": None},
    [Ref("pred"), Ref("target")], {"reduction_override": "none"}, grad_of=("pred", "target"))
add("kd_T4_lw0.5_sum_weight", {"type": "KnowledgeDistillationKLDivLoss", "T": 4, "loss_weight": 0.5},
    {"pred": kp, "target": ks, "weight": kw_}, [Ref("pred"), Ref("target")],
    {"weight": Ref("weight"), "reduction_override": "sum"})
add("kd_T2.5_mean_avg_factor", {"type": "KnowledgeDistillationKLDivLoss", "T": 2.5},
    {"pred": kp, "target": ks, "weight": kw_}, [Ref("pred"), Ref("target")],
    {"weight": Ref("weight"), "avg_factor": 3.0})
add("kd_default_float32", KD, {"pred": kp.float(), "target": ks.float(), "weight": None},
    [Ref("pred"), Ref("target")], {"reduction_override": "sum"})
add_error("kd_T_below_1", {"type": "KnowledgeDistillationKLDivLoss", "T": 0.5}, {}, [], at_build=True)
add_error("kd_sum_avg_factor", KD, {"pred": kp, "target": ks}, [Ref("pred"), Ref("target")],
          {"reduction_override": "sum", "avg_factor": 2.0})
add_error("kd_shape_mismatch", KD, {"pred": kp, "target": ks[:, :4].clone()}, [Ref("pred"), Ref("target")])

# ================================================================ SeesawLoss
SC = 5  # num_classes; cls_score has SC + 2 columns, label SC is background


def seesaw_inputs(n, lo_bg=True, dtype=F64, weights=False):
    labels = randint(0, SC + 1, n)
    labels[0], labels[1] = 0, SC  # at least one foreground and one background
    d = {"pred": randn(n, SC + 2, scale=2.0, dtype=dtype), "target": labels}
    d["label_weights"] = rand(n, dtype=dtype) if weights else None
    return d


SS = {"type": "SeesawLoss", "num_classes": SC}
steps = [seesaw_inputs(12), seesaw_inputs(10), seesaw_inputs(14)]
steps[1]["target"][2:6] = 3  # make class 3 frequent, so the mitigation factor differs from 1
add_sequence("seesaw_default_dict_mean_seq3", SS, steps, [Ref("pred"), Ref("target")], state=["cum_samples"])
add_sequence("seesaw_p1.5_q1_eps0.1_dict_avg_factor_seq3",
             {"type": "SeesawLoss", "num_classes": SC, "p": 1.5, "q": 1.0, "eps": 0.1},
             [seesaw_inputs(9, weights=True), seesaw_inputs(11, weights=True), seesaw_inputs(8, weights=True)],
             [Ref("pred"), Ref("target")], {"label_weights": Ref("label_weights"), "avg_factor": 7.0},
             state=["cum_samples"])
SI = seesaw_inputs(10, weights=True)
add("seesaw_no_dict_sum_lw2_weights", {"type": "SeesawLoss", "num_classes": SC, "return_dict": False,
                                       "loss_weight": 2.0},
    SI, [Ref("pred"), Ref("target")], {"label_weights": Ref("label_weights"), "reduction_override": "sum"},
    state=["cum_samples"])
add("seesaw_dict_none", SS, SI, [Ref("pred"), Ref("target")], {"reduction_override": "none"},
    state=["cum_samples"], per_entry_grads=True)
add("seesaw_p0_q0_plain_ce_mean", {"type": "SeesawLoss", "num_classes": SC, "p": 0.0, "q": 0.0},
    SI, [Ref("pred"), Ref("target")], {"label_weights": Ref("label_weights")}, state=["cum_samples"])
BG = {"pred": randn(6, SC + 2), "target": torch.full((6,), SC, dtype=I64), "label_weights": None}
add("seesaw_all_background", SS, BG, [Ref("pred"), Ref("target")], state=["cum_samples"], per_entry_grads=True)
S32 = seesaw_inputs(10, dtype=F32, weights=True)
add("seesaw_float32_extras", SS, S32, [Ref("pred"), Ref("target")], {"label_weights": Ref("label_weights")},
    state=["cum_samples"],
    extras=lambda loss: {"get_cls_channels": torch.tensor(loss.get_cls_channels(SC)),
                         "get_activation": loss.get_activation(S32["pred"]),
                         **{f"get_accuracy.{k}": v for k, v in loss.get_accuracy(S32["pred"], S32["target"]).items()}},
    extras_python=["loss.get_cls_channels(5)", "loss.get_activation(pred)", "loss.get_accuracy(pred, target)"])
add_error("seesaw_sum_avg_factor", SS, SI, [Ref("pred"), Ref("target")],
          {"reduction_override": "sum", "avg_factor": 2.0})
add_error("seesaw_use_sigmoid", {"type": "SeesawLoss", "num_classes": SC, "use_sigmoid": True}, {}, [],
          at_build=True)
add_error("seesaw_wrong_channels", SS, {"pred": SI["pred"][:, :SC + 1].clone(), "target": SI["target"]},
          [Ref("pred"), Ref("target")])
add_error("seesaw_no_dict_none_shape_mismatch", {"type": "SeesawLoss", "num_classes": SC, "return_dict": False},
          SI, [Ref("pred"), Ref("target")], {"reduction_override": "none"})

# ================================================================ EQLV2Loss
EC = 4  # num_classes; cls_score has EC + 1 columns, label EC is background (the objectness column)


def eql_inputs(n, dtype=F64):
    labels = randint(0, EC + 1, n)
    labels[0] = EC
    return {"pred": randn(n, EC + 1, scale=2.0, dtype=dtype), "target": labels, "weight": rand(n, EC + 1, dtype=dtype)}


EQ = {"type": "EQLV2Loss", "num_classes": EC}
EQS = ["pos_grad", "neg_grad", "pos_neg"]
add_sequence("eqlv2_default_seq3", EQ, [eql_inputs(10), eql_inputs(12), eql_inputs(9)],
             [Ref("pred"), Ref("target")], state=EQS,
             extras=lambda loss: {"get_weight.pos_w": loss.get_weight(torch.zeros(1, EC + 1, dtype=F64))[0][0],
                                  "get_weight.neg_w": loss.get_weight(torch.zeros(1, EC + 1, dtype=F64))[1][0]},
             extras_python=["loss.get_weight(pred) after the call (row 0 of pos_w, neg_w)"])
EQC = {"type": "EQLV2Loss", "num_classes": EC, "mu": 0.5, "alpha": 2.0, "gamma": 6, "loss_weight": 2.0,
       "reduction": "sum", "class_weight": [1.0, 2.0, 3.0, 4.0, 5.0]}
add_sequence("eqlv2_custom_args_ignored_seq3", EQC, [eql_inputs(10), eql_inputs(12), eql_inputs(9)],
             [Ref("pred"), Ref("target")], {"weight": Ref("weight"), "avg_factor": 3.0, "reduction_override": "none"},
             state=EQS)
E32 = eql_inputs(8, dtype=F32)
add_sequence("eqlv2_float32_seq3", EQ, [E32, eql_inputs(8, dtype=F32), eql_inputs(8, dtype=F32)],
             [Ref("pred"), Ref("target")], state=EQS)
ACT = randn(5, EC + 1)
for two in [True, False]:
    add(f"eqlv2_get_activation_test_with_obj_{two}", {"type": "EQLV2Loss", "num_classes": EC, "test_with_obj": two},
        {"pred": ACT}, [Ref("pred")], method="get_activation", grad_of=(), out_names=["activation"],
        extras=lambda loss: {"get_channel_num": torch.tensor(loss.get_channel_num(EC))},
        extras_python=["loss.get_channel_num(4)"])
EQD = {"type": "EQLV2Loss", "num_classes": EC, "use_distributed": True}
EI = eql_inputs(10)
add_error("eqlv2_use_distributed_without_process_group", EQD, EI, [Ref("pred"), Ref("target")])
add_error("eqlv2_channels_not_num_classes_plus_1", EQ, {"pred": randn(6, EC), "target": randint(0, EC, 6)},
          [Ref("pred"), Ref("target")])
# use_distributed=True needs an initialised default process group (dist.all_reduce on pos_grad and
# neg_grad). With a single-process gloo group (world size 1, file:// rendezvous) all_reduce is
# the identity: the outputs and state equal those of use_distributed=False.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
import torch.distributed as dist  # noqa: E402

_rdv = tempfile.NamedTemporaryFile(delete=False)
_rdv.close()
os.unlink(_rdv.name)
dist.init_process_group("gloo", init_method=f"file://{_rdv.name}", rank=0, world_size=1)
_dist_case = add_sequence("eqlv2_use_distributed_world1_seq3", EQD, [EI, eql_inputs(10), eql_inputs(10)],
                          [Ref("pred"), Ref("target")], state=EQS,
                          note="run under torch.distributed.init_process_group('gloo', world_size=1, rank=0); "
                               "all_reduce is then the identity: identical to use_distributed=False")
dist.destroy_process_group()
_plain = build(EQ)
for _step in _dist_case["sequence"]:  # the same inputs without use_distributed give the same numbers
    _ins = {k: torch.tensor(v["data"], dtype=getattr(torch, v["dtype"])).reshape(v["shape"])
            for k, v in _step["inputs"].items()}
    _o = evaluate(_plain, _ins, [Ref("pred"), Ref("target")], {})
    assert enc(_o["loss"]) == _step["outputs"]["loss"] and enc(_o["grad_pred"]) == _step["outputs"]["grad_pred"]
    assert all(enc(getattr(_plain, k)) == _step["state_after"][k] for k in EQS)

# ================================================================ MSELoss
mp, mt, mw = randn(9, 4), randn(9, 4), rand(9, 4)
MS = {"type": "MSELoss"}
add("mse_default_mean", MS, {"pred": mp, "target": mt, "weight": None}, [Ref("pred"), Ref("target")])
add("mse_none_weight", MS, {"pred": mp, "target": mt, "weight": mw}, [Ref("pred"), Ref("target")],
    {"weight": Ref("weight"), "reduction_override": "none"})
add("mse_lw2.5_sum_weight_col", {"type": "MSELoss", "loss_weight": 2.5, "reduction": "sum"},
    {"pred": mp, "target": mt, "weight": mw[:, :1].clone()}, [Ref("pred"), Ref("target")], {"weight": Ref("weight")})
add("mse_mean_avg_factor", MS, {"pred": mp, "target": mt, "weight": mw}, [Ref("pred"), Ref("target")],
    {"weight": Ref("weight"), "avg_factor": 12.0})
add("mse_float32", MS, {"pred": mp.float(), "target": mt.float(), "weight": None}, [Ref("pred"), Ref("target")])
add_error("mse_sum_avg_factor", MS, {"pred": mp, "target": mt}, [Ref("pred"), Ref("target")],
          {"reduction_override": "sum", "avg_factor": 2.0})


# ================================================================ L2Loss / MarginL2Loss
def l2_inputs(n=10, c=6, dtype=F64, int_target=False):
    target = (torch.rand(n, c, generator=GEN) < 0.2).to(F64)
    target[0, 0] = 1.0
    pred = rand(n, c, lo=-0.15, hi=1.15)
    weight = (torch.rand(n, c, generator=GEN) < 0.85).to(F64) * rand(n, c, lo=0.5, hi=1.5)
    return {"pred": pred.to(dtype), "target": target.to(I64 if int_target else dtype), "weight": weight.to(dtype)}


def after_mutation(ins):
    """update_weight writes into the caller's target (and weight): recorded after the call."""
    out = {"target_after_call": ins["target"].clone()}
    if isinstance(ins.get("weight"), torch.Tensor):
        out["weight_after_call"] = ins["weight"].detach().clone()
    return out


CLONE = Ref("pred", "pred.clone()", lambda x: x.clone())  # margins subtract in place: not on a leaf
for ty in ["L2Loss", "MarginL2Loss"]:
    tag = "l2" if ty == "L2Loss" else "margin_l2"
    LI = l2_inputs()
    add(f"{tag}_default_mean_no_weight", {"type": ty}, dict(LI, weight=None), [Ref("pred"), Ref("target")],
        after=after_mutation)
    add(f"{tag}_margins_none_weight", {"type": ty, "pos_margin": 0.2, "neg_margin": 0.1}, LI,
        [CLONE, Ref("target")], {"weight": Ref("weight"), "reduction_override": "none"}, after=after_mutation)
    HM = l2_inputs(12, 5)
    HM["pred"] = rand(12, 5, lo=0.05, hi=0.95)
    add(f"{tag}_neg_pos_ub2_hard_mining_mean", {"type": ty, "neg_pos_ub": 2, "hard_mining": True}, HM,
        [Ref("pred"), Ref("target")], {"weight": Ref("weight")}, after=after_mutation)
    add(f"{tag}_neg_pos_ub3_margins_hard_mining_lw0.5_avg_factor_ignored",
        {"type": ty, "neg_pos_ub": 3, "hard_mining": True, "pos_margin": 0.3, "neg_margin": 0.05,
         "loss_weight": 0.5}, HM, [CLONE, Ref("target")], {"weight": Ref("weight"), "avg_factor": 10.0},
        after=after_mutation)
    NS = l2_inputs(8, 4)
    NS["target"][:, :2] = 1.0  # num_neg / num_pos <= 30: the random sampler is not reached
    add(f"{tag}_neg_pos_ub30_random_not_reached", {"type": ty, "neg_pos_ub": 30}, NS,
        [Ref("pred"), Ref("target")], {"weight": Ref("weight")}, after=after_mutation)
    F32I = l2_inputs(dtype=F32)
    add(f"{tag}_float32", {"type": ty}, F32I, [Ref("pred"), Ref("target")], {"weight": Ref("weight")},
        after=after_mutation)
    add_error(f"{tag}_sum_always_raises", {"type": ty}, LI, [Ref("pred"), Ref("target")],
              {"reduction_override": "sum"})
    add_error(f"{tag}_margin_on_leaf_pred", {"type": ty, "pos_margin": 0.2}, LI, [Ref("pred"), Ref("target")])
add("margin_l2_int64_target", {"type": "MarginL2Loss", "pos_margin": 0.1}, l2_inputs(int_target=True),
    [CLONE, Ref("target")], {"weight": Ref("weight")}, after=after_mutation)

# ================================================================ DiceLoss
dp = randn(5, 4, 3, scale=2.0)
dt = (torch.rand(5, 4, 3, generator=GEN) < 0.4).to(F64)
dt[4] = 0.0  # an empty mask
dw = rand(5)
DL = {"type": "DiceLoss"}
add("dice_default_mean", DL, {"pred": dp, "target": dt, "weight": None}, [Ref("pred"), Ref("target")])
add("dice_naive_none_weight", {"type": "DiceLoss", "naive_dice": True}, {"pred": dp, "target": dt, "weight": dw},
    [Ref("pred"), Ref("target")], {"weight": Ref("weight"), "reduction_override": "none"})
add("dice_not_activated_eps1_lw2_sum", {"type": "DiceLoss", "activate": False, "eps": 1.0, "loss_weight": 2.0},
    {"pred": torch.sigmoid(dp), "target": dt, "weight": None}, [Ref("pred"), Ref("target")],
    {"reduction_override": "sum"})
add("dice_naive_eps1e-5_mean_avg_factor", {"type": "DiceLoss", "naive_dice": True, "eps": 1e-5},
    {"pred": dp, "target": dt, "weight": dw}, [Ref("pred"), Ref("target")],
    {"weight": Ref("weight"), "avg_factor": 2.5})
add("dice_int64_target_float32_pred", DL, {"pred": dp.float(), "target": dt.to(I64), "weight": None},
    [Ref("pred"), Ref("target")])
add("dice_use_sigmoid_false_not_activated", {"type": "DiceLoss", "use_sigmoid": False, "activate": False},
    {"pred": torch.sigmoid(dp), "target": dt, "weight": None}, [Ref("pred"), Ref("target")])
add_error("dice_softmax_activate", {"type": "DiceLoss", "use_sigmoid": False}, {"pred": dp, "target": dt},
          [Ref("pred"), Ref("target")])
add_error("dice_weight_N1", DL, {"pred": dp, "target": dt, "weight": dw[:, None].clone()},
          [Ref("pred"), Ref("target")], {"weight": Ref("weight")})
add_error("dice_sum_avg_factor", DL, {"pred": dp, "target": dt}, [Ref("pred"), Ref("target")],
          {"reduction_override": "sum", "avg_factor": 2.0})

# ================================================================ FocalCustomLoss
FC = 4
fp = randn(9, FC, scale=2.0)
ft = randint(0, FC + 1, 9)
ft[0], ft[1] = FC, 2
fw = rand(9)
FCD = {"type": "FocalCustomLoss", "num_classes": FC}
add("focal_custom_default_mean", FCD, {"pred": fp, "target": ft, "weight": None}, [Ref("pred"), Ref("target")])
add("focal_custom_g0_a0.5_none_weightN", {"type": "FocalCustomLoss", "num_classes": FC, "gamma": 0.0, "alpha": 0.5},
    {"pred": fp, "target": ft, "weight": fw}, [Ref("pred"), Ref("target")],
    {"weight": Ref("weight"), "reduction_override": "none"})
add("focal_custom_lw2_sum_weightNC", {"type": "FocalCustomLoss", "num_classes": FC, "loss_weight": 2.0,
                                      "reduction": "sum"},
    {"pred": fp, "target": ft, "weight": rand(9, FC)}, [Ref("pred"), Ref("target")], {"weight": Ref("weight")})
add("focal_custom_activated_ignored_mean_avg_factor", {"type": "FocalCustomLoss", "num_classes": FC,
                                                       "activated": True, "gamma": 1.5},
    {"pred": fp, "target": ft, "weight": fw}, [Ref("pred"), Ref("target")],
    {"weight": Ref("weight"), "avg_factor": 4.0})
fp5 = randn(9, FC + 1)
add("focal_custom_pred_wider_than_num_classes", FCD, {"pred": fp5, "target": ft, "weight": None},
    [Ref("pred"), Ref("target")],
    extras=lambda loss: {"get_cls_channels": torch.tensor(loss.get_cls_channels(FC)),
                         "get_activation": loss.get_activation(fp5),
                         **{f"get_accuracy.{k}": v for k, v in loss.get_accuracy(fp5, ft).items()}},
    extras_python=["loss.get_cls_channels(4)", "loss.get_activation(pred)", "loss.get_accuracy(pred, target)"])
add("focal_custom_float32", FCD, {"pred": fp.float(), "target": ft, "weight": fw.float()},
    [Ref("pred"), Ref("target")], {"weight": Ref("weight")})
add_error("focal_custom_num_classes_missing", {"type": "FocalCustomLoss"}, {}, [], at_build=True)
add_error("focal_custom_softmax", {"type": "FocalCustomLoss", "num_classes": FC, "use_sigmoid": False}, {}, [],
          at_build=True)
add_error("focal_custom_sum_avg_factor", FCD, {"pred": fp, "target": ft}, [Ref("pred"), Ref("target")],
          {"reduction_override": "sum", "avg_factor": 2.0})

# ================================================================ CrossEntropyCustomLoss
CC = 4
cp = randn(10, CC + 1, scale=2.0)
ct = randint(0, CC + 1, 10)
ct[0], ct[1], ct[2] = CC, 2, 2
cw = rand(10)
CED = {"type": "CrossEntropyCustomLoss", "num_classes": CC}
add("ce_custom_default_mean", CED, {"pred": cp, "target": ct, "weight": None}, [Ref("pred"), Ref("target")],
    extras=lambda loss: {"get_cls_channels": torch.tensor(loss.get_cls_channels(CC)),
                         "get_activation": loss.get_activation(cp),
                         **{f"get_accuracy.{k}": v for k, v in loss.get_accuracy(cp, ct).items()}},
    extras_python=["loss.get_cls_channels(4)", "loss.get_activation(pred)", "loss.get_accuracy(pred, target)"])
add("ce_custom_class_weight_none_weight", {"type": "CrossEntropyCustomLoss", "num_classes": CC,
                                           "class_weight": [1.0, 2.0, 0.5, 1.5, 0.25]},
    {"pred": cp, "target": ct, "weight": cw}, [Ref("pred"), Ref("target")],
    {"weight": Ref("weight"), "reduction_override": "none"})
add("ce_custom_ignore2_avg_non_ignore_mean", {"type": "CrossEntropyCustomLoss", "num_classes": CC,
                                              "ignore_index": 2, "avg_non_ignore": True},
    {"pred": cp, "target": ct, "weight": None}, [Ref("pred"), Ref("target")])
add("ce_custom_lw2_mean_avg_factor_weight", {"type": "CrossEntropyCustomLoss", "num_classes": CC, "loss_weight": 2.0},
    {"pred": cp, "target": ct, "weight": cw}, [Ref("pred"), Ref("target")],
    {"weight": Ref("weight"), "avg_factor": 6.0})
cps = randn(10, CC, scale=2.0)
add("ce_custom_sigmoid_sum", {"type": "CrossEntropyCustomLoss", "num_classes": CC, "use_sigmoid": True},
    {"pred": cps, "target": ct, "weight": None}, [Ref("pred"), Ref("target")], {"reduction_override": "sum"},
    extras=lambda loss: {"get_cls_channels": torch.tensor(loss.get_cls_channels(CC)),
                         "get_activation": loss.get_activation(cps),
                         **{f"get_accuracy.{k}": v for k, v in loss.get_accuracy(cps, ct).items()}},
    extras_python=["loss.get_cls_channels(4)", "loss.get_activation(pred)", "loss.get_accuracy(pred, target)"])
cp6 = randn(6, CC + 2)
add("ce_custom_wide_pred_activation_skips_column", CED, {"pred": cp6, "target": ct[:6].clone(), "weight": None},
    [Ref("pred"), Ref("target")],
    extras=lambda loss: {"get_activation": loss.get_activation(cp6)},
    extras_python=["loss.get_activation(pred)"])
add("ce_custom_float32", CED, {"pred": cp.float(), "target": ct, "weight": cw.float()},
    [Ref("pred"), Ref("target")], {"weight": Ref("weight")})
add_error("ce_custom_num_classes_missing", {"type": "CrossEntropyCustomLoss"}, {}, [], at_build=True)
add_error("ce_custom_sum_avg_factor", CED, {"pred": cp, "target": ct}, [Ref("pred"), Ref("target")],
          {"reduction_override": "sum", "avg_factor": 2.0})

# ================================================================ AssociativeEmbeddingLoss
AE = {"type": "AssociativeEmbeddingLoss"}
AE_OUT = ["pull_loss", "push_loss"]
tl, br = randn(2, 1, 6, 7), randn(2, 1, 6, 7)
M1 = [[[[0, 1], [3, 5]], [[2, 2], [5, 6]], [[1, 4], [4, 4]]], [[[0, 0], [5, 6]]]]
add("ae_default_dim1", AE, {"pred": tl, "target": br}, [Ref("pred"), Ref("target"), M1], grad_of=("pred", "target"),
    per_entry_grads=True, out_names=AE_OUT)
M2 = [[], [[[1, 1], [2, 3]], [[0, 5], [4, 6]]], [[[3, 3], [3, 3]]]]
tl3, br3 = randn(3, 1, 6, 7), randn(3, 1, 6, 7)
add("ae_pull1_push0.5_empty_image", {"type": "AssociativeEmbeddingLoss", "pull_weight": 1.0, "push_weight": 0.5},
    {"pred": tl3, "target": br3}, [Ref("pred"), Ref("target"), M2], grad_of=("pred", "target"), per_entry_grads=True,
    out_names=AE_OUT)
tl2, br2 = randn(2, 2, 5, 5, scale=0.4), randn(2, 2, 5, 5, scale=0.4)
add("ae_dim2_N_counts_obj_times_dim", AE, {"pred": tl2, "target": br2},
    [Ref("pred"), Ref("target"), [[[[0, 1], [3, 4]], [[2, 0], [4, 2]]], [[[1, 1], [2, 2]]]]],
    grad_of=("pred", "target"), per_entry_grads=True,
    out_names=AE_OUT)
add("ae_all_images_empty", AE, {"pred": tl, "target": br}, [Ref("pred"), Ref("target"), [[], []]],
    grad_of=("pred", "target"), out_names=AE_OUT)
add("ae_float32", AE, {"pred": tl.float(), "target": br.float()}, [Ref("pred"), Ref("target"), M1],
    grad_of=("pred", "target"), out_names=AE_OUT)

# ================================================================ TripletLoss
TR = {"type": "TripletLoss"}
tx = randn(8, 5)
ty_ = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
add("triplet_default_margin0.3", TR, {"pred": tx, "target": ty_}, [Ref("pred"), Ref("target")])
add("triplet_margin1_lw2", {"type": "TripletLoss", "margin": 1.0, "loss_weight": 2.0}, {"pred": tx, "target": ty_},
    [Ref("pred"), Ref("target")])
txd = tx.clone()
txd[1] = txd[0]  # duplicate features: the distance clamp(1e-12).sqrt()
add("triplet_duplicate_rows_margin5", {"type": "TripletLoss", "margin": 5.0}, {"pred": txd, "target": ty_},
    [Ref("pred"), Ref("target")])
add("triplet_float32", TR, {"pred": tx.float(), "target": ty_}, [Ref("pred"), Ref("target")])
add_error("triplet_no_negative", TR, {"pred": tx[:3].clone(), "target": torch.zeros(3, dtype=I64)},
          [Ref("pred"), Ref("target")])
add_error("triplet_hard_mining_false", {"type": "TripletLoss", "hard_mining": False},
          {"pred": tx, "target": ty_}, [Ref("pred"), Ref("target")])

# ================================================================ MultiPosCrossEntropyLoss
MP = {"type": "MultiPosCrossEntropyLoss"}
xp = randn(6, 5, scale=2.0)
xl = (torch.rand(6, 5, generator=GEN) < 0.35).to(F64)
xl[0] = torch.tensor([1.0, 0, 0, 0, 0], dtype=F64)
xl[1] = torch.tensor([1.0, 1, 0, 0, 1], dtype=F64)
xl[2] = 0.0  # no positive
xl[3] = torch.tensor([2.0, 0, -1, 0, 1], dtype=F64)  # 2 counts as positive (>= 1), -1 is neither
xw = rand(6)
add("multipos_default_mean", MP, {"pred": xp, "target": xl, "weight": None}, [Ref("pred"), Ref("target")])
add("multipos_none_weight", MP, {"pred": xp, "target": xl, "weight": xw}, [Ref("pred"), Ref("target")],
    {"weight": Ref("weight"), "reduction_override": "none"})
add("multipos_lw2_sum", {"type": "MultiPosCrossEntropyLoss", "loss_weight": 2.0, "reduction": "sum"},
    {"pred": xp, "target": xl, "weight": xw}, [Ref("pred"), Ref("target")], {"weight": Ref("weight")})
add("multipos_mean_avg_factor", MP, {"pred": xp, "target": xl, "weight": xw}, [Ref("pred"), Ref("target")],
    {"weight": Ref("weight"), "avg_factor": 3.0})
add("multipos_float32_int64_label", MP, {"pred": xp.float(), "target": xl.to(I64), "weight": None},
    [Ref("pred"), Ref("target")], {"reduction_override": "none"})
add_error("multipos_shape_mismatch", MP, {"pred": xp, "target": xl[:, :4].clone()}, [Ref("pred"), Ref("target")])
add_error("multipos_sum_avg_factor", MP, {"pred": xp, "target": xl}, [Ref("pred"), Ref("target")],
          {"reduction_override": "sum", "avg_factor": 2.0})

# ================================================================ DDQAuxLoss
DDQ = MOD["ddq_detr_aux_loss"].DDQAuxLoss
add_error("ddq_aux_not_registered", {"type": "DDQAuxLoss"}, {}, [], at_build=True)


def ddq_builder(config):
    kw = {k: v for k, v in config.items() if k != "type"}
    return DDQ(**json.loads(json.dumps(kw)))


def ddq_inputs(nq, dtype):
    xy = rand(2, nq, 2, lo=0, hi=50)
    wh = rand(2, nq, 2, lo=4, hi=30)
    return {"pred": torch.sigmoid(randn(2, nq, 3, scale=2.0)).to(dtype),
            "bbox_preds": torch.cat([xy, xy + wh], -1).to(dtype),
            "gt_bboxes.img0": torch.tensor([[5, 6, 30, 34], [20, 10, 60, 50], [40, 40, 70, 78]], dtype=dtype),
            "gt_labels.img0": torch.tensor([0, 2, 1]),
            "gt_bboxes.img1": torch.zeros(0, 4, dtype=dtype), "gt_labels.img1": torch.zeros(0, dtype=I64)}


def ddq_targets(ins_src):
    def extras(loss):
        ins = ins_src
        t = loss.get_targets(ins["pred"], ins["bbox_preds"], [ins["gt_bboxes.img0"], ins["gt_bboxes.img1"]],
                             [{"img_shape": (80, 96)}] * 2,
                             gt_labels_list=[ins["gt_labels.img0"], ins["gt_labels.img1"]])
        out = {}
        for name, lst in zip(["labels", "label_weights", "bbox_targets", "alignment_metrics"], t):
            for i, x in enumerate(lst):
                out[f"get_targets.{name}.img{i}"] = x
        return out
    return extras


DDQ_POS = [Ref("pred"), Ref("bbox_preds"), ListRef("gt_bboxes"), ListRef("gt_labels"),
           [{"img_shape": (80, 96)}, {"img_shape": (80, 96)}]]
DDQ_CUSTOM = {"type": "DDQAuxLoss",
              "loss_cls": {"type": "QualityFocalLoss", "use_sigmoid": True, "activated": True, "beta": 1.5,
                           "loss_weight": 0.5},
              "loss_bbox": {"type": "GIoULoss", "loss_weight": 1.0},
              "train_cfg": {"assigner": {"type": "TopkHungarianAssigner", "topk": 2}, "alpha": 1, "beta": 6}}
# float64 inputs raise: _get_target_single writes float64 metrics into its float32
# norm_alignment_metrics buffer (bbox_preds.new_zeros(..., dtype=torch.float)).
add_error("ddq_aux_float64_inputs", {"type": "DDQAuxLoss"}, ddq_inputs(16, F64), DDQ_POS, method="loss",
          grad_of=("pred", "bbox_preds"), builder=ddq_builder)
for cfg, tag, nq in [({"type": "DDQAuxLoss"}, "default", 16), (DDQ_CUSTOM, "qfl_beta1.5_giou1_topk2", 12)]:
    DI = ddq_inputs(nq, F32)
    add(f"ddq_aux_{tag}_float32", cfg, DI, DDQ_POS, method="loss", grad_of=("pred", "bbox_preds"),
        builder=ddq_builder, per_entry_grads=True, extras=ddq_targets(DI),
        extras_python=["loss.get_targets(pred, bbox_preds, [gt_bboxes.img0, gt_bboxes.img1], img_metas, "
                       "gt_labels_list=[gt_labels.img0, gt_labels.img1])"],
        note="DDQAuxLoss is not in the MODELS registry: built as DDQAuxLoss(**config without 'type'); "
             "pred = cls_scores (probabilities), img_metas = [{'img_shape': (80, 96)}] * 2")

# ================================================================ GHM momentum sequences
# GHMC and GHMR with momentum: 3 calls on one object, whose acc_sum is a float32 buffer whatever
# the inputs' dtype (ghm_loss.py:52, 152). Momentum 0.7 is no float32 value (the rounding of the
# update's product shows from call 2 on); fractional label weights make GHMR's float32 total
# `label_weight.float().sum()` inexact. Own generator, so that the cases above stay as they are.
GHM_GEN = torch.Generator().manual_seed(2026)


def ghm_steps(loss_name, shape, dtype, fractional):
    def rn():
        return torch.randn(shape, generator=GHM_GEN, dtype=F64).to(dtype)

    def ru():
        return torch.rand(shape, generator=GHM_GEN, dtype=F64).to(dtype)

    steps = []
    for _ in range(3):
        if loss_name == "GHMR":
            pred, target = rn() * 0.2, rn() * 0.2
        else:
            pred, target = rn() * 2.0, (ru() < 0.1).to(dtype)
        label_weight = (ru() < 0.8).to(dtype)
        if fractional:
            label_weight = label_weight * ru()
        steps.append({"pred": pred, "target": target, "label_weight": label_weight})
    return steps


for loss_name, cfg, shape, dtype, fractional in [
    ("GHMR", {"mu": 0.02, "bins": 10, "momentum": 0.7}, (120, 4), F64, False),
    ("GHMR", {"mu": 0.02, "bins": 10, "momentum": 0.7}, (120, 4), F64, True),
    ("GHMR", {"mu": 0.02, "bins": 10, "momentum": 0.75, "reduction": "none"}, (120, 4), F64, True),
    ("GHMR", {"mu": 0.02, "bins": 10, "momentum": 0.7}, (120, 4), F32, True),
    ("GHMC", {"bins": 30, "momentum": 0.7, "use_sigmoid": True}, (100, 8), F64, False),
    ("GHMC", {"bins": 10, "momentum": 0.3, "use_sigmoid": True, "reduction": "none"}, (150, 6), F64, True),
    ("GHMC", {"bins": 30, "momentum": 0.7, "use_sigmoid": True}, (100, 8), F32, False),
]:
    add_sequence(
        f"{loss_name.lower()}_bins{cfg['bins']}_mom{cfg['momentum']}_{'frac' if fractional else 'mask'}_"
        f"{cfg.get('reduction', 'mean')}_{str(dtype).replace('torch.', '')}_seq3",
        {"type": loss_name, **cfg}, ghm_steps(loss_name, shape, dtype, fractional),
        [Ref("pred"), Ref("target")], {"label_weight": Ref("label_weight")}, state=("acc_sum",))

# ---------------------------------------------------------------- write
assert not CALLED, CALLED
counts, ecounts = {}, {}
for c in CASES:
    counts[c["loss"]] = counts.get(c["loss"], 0) + 1
for c in ERRORS:
    ecounts[c["loss"]] = ecounts.get(c["loss"], 0) + 1
import mmcv  # noqa: E402
import mmengine  # noqa: E402
import numpy  # noqa: E402

doc = {"generator": {"script": "tests/data/gen_loss_cases.py", "mmdet": mmdet.__version__,
                     "mmengine": mmengine.__version__, "mmcv": mmcv.__version__ + " (mmcv-lite wheel, ops stubbed)",
                     "torch": torch.__version__, "numpy": numpy.__version__, "python": platform.python_version(),
                     "device": "cpu", "torch_num_threads": 1,
                     "mmdet_loss_files": {m: f"mmdet/models/losses/{m}.py" for m in LOSS_MODULES},
                     "grad_definition": "torch.autograd.grad(sum over output tensors of output.sum(), input)",
                     "float32_eps_in_avg_factor": EPS32,
                     "note": "float64 CPU evaluation of the unmodified mmdet 3.3.0 loss classes, built from each "
                             "case's config with MODELS.build (DDQAuxLoss: directly)"},
       "counts": counts, "error_counts": ecounts, "cases": CASES, "error_cases": ERRORS}
with open(sys.argv[1], "w") as f:
    json.dump(doc, f, indent=None, separators=(",", ":"), allow_nan=False)
print(json.dumps(counts))
print(json.dumps(ecounts))
print(len(CASES), "cases", len(ERRORS), "error cases")
