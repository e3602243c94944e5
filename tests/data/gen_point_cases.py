"""Reference cases of MMDetection 3.3's point priors, distance coder and FCOS head targets:
point_cases.json.

MlvlPointGenerator (grid_priors with and without stride, valid_flags, sparse_priors) and
DistancePointBBoxCoder (encode = bbox2distance with max_dis and eps, decode = distance2bbox with
max_shape as one image, per image of a batch, or none) FCOSHead (get_targets, and the inputs
its loss_by_feat hands to its three losses, recorded by wrappers around the loss modules),
TaskAlignedAssigner, DynamicSoftLabelAssigner, RTMDetHead and GFLHead (what their
loss_by_feat hands their losses, and their divisors), TOODHead.get_targets after its initial
epochs,
computed by the real, unmodified
MMDetection 3.3.0 from its wheel, imported as for pipeline_cases.json (README.md): mmcv from
mmcv-lite 2.1.0 with mmcv.ops served by stubs that raise if called; mmdet.models,
mmdet.models.losses, mmdet.models.dense_heads and mmdet.models.layers as bare packages (their
__init__ files do not run), then mmdet.models.task_modules (whose __init__ registers every prior
generator and coder), mmdet.models.utils, mmdet.models.layers.normed_predictor, the four loss
modules and mmdet.models.dense_heads.fcos_head, mmdet.models.layers.transformer and
mmdet.models.dense_heads.rtmdet_head, gfl_head and tood_head imported unmodified; objects built with
mmdet.registry.TASK_UTILS.build / MODELS.build from their config dicts (FCOSHead in full, with
feat_channels=32 to keep its unused conv tower small).

    pip install --no-deps mmdet==3.3.0 mmcv-lite==2.1.0 mmengine==0.10.7
    pip install numpy scipy addict pyyaml rich termcolor yapf opencv-python-headless matplotlib \
        shapely pycocotools terminaltables six tqdm
    python tests/data/gen_point_cases.py tests/data/point_cases.json
"""
import importlib
import json
import math
import platform
import sys

import torch

torch.set_num_threads(1)

from mmdet_import import CALLED, import_mmdet  # noqa: E402  (beside this script)

mmdet = import_mmdet(["mmdet.models", "mmdet.models.losses", "mmdet.models.dense_heads", "mmdet.models.layers"])
sys.modules["mmdet.models.layers"].NormedConv2d = importlib.import_module(
    "mmdet.models.layers.normed_predictor").NormedConv2d
for _m in ["focal_loss", "iou_loss", "cross_entropy_loss", "gfocal_loss"]:
    importlib.import_module("mmdet.models.losses." + _m)
importlib.import_module("mmdet.models.dense_heads.fcos_head")
importlib.import_module("mmdet.models.layers.transformer")
importlib.import_module("mmdet.models.dense_heads.rtmdet_head")
importlib.import_module("mmdet.models.dense_heads.gfl_head")
importlib.import_module("mmdet.models.dense_heads.tood_head")
from mmengine.structures import InstanceData  # noqa: E402
from mmdet.registry import MODELS, TASK_UTILS  # noqa: E402

CASES = []


def enc(t):
    t = t.detach().cpu()
    data = t.flatten().tolist()
    if t.dtype.is_floating_point:
        data = [x if math.isfinite(x) else ("nan" if x != x else ("inf" if x > 0 else "-inf")) for x in data]
    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "data": data}


def case(name, family, config, call, args, inputs, outputs):
    CASES.append({"name": name, "family": family, "config": config, "call": call, "args": args,
                  "inputs": {k: enc(v) for k, v in inputs.items()},
                  "outputs": {k: enc(v) for k, v in outputs.items()}})


DTYPES = {"float32": torch.float32, "float64": torch.float64}

# ---- MlvlPointGenerator ----
GEN = [
    ("fcos", {"type": "MlvlPointGenerator", "strides": [8, 16, 32, 64, 128]},
     [[5, 7], [3, 4], [2, 2], [1, 1], [1, 1]], [37, 50]),
    ("rtmdet_offset0", {"type": "MlvlPointGenerator", "offset": 0, "strides": [8, 16, 32]},
     [[4, 6], [2, 3], [1, 2]], [30, 45]),
    ("rect_strides", {"type": "MlvlPointGenerator", "strides": [[8, 4], [16, 12]], "offset": 0.25},
     [[3, 5], [2, 2]], [10, 33]),
    ("odd_offset_stride", {"type": "MlvlPointGenerator", "strides": [6, 13.5], "offset": 0.3},
     [[3, 3], [2, 1]], [17, 11]),
    ("empty_level", {"type": "MlvlPointGenerator", "strides": [8, 16]},
     [[0, 3], [2, 0]], [16, 16]),
]
for tag, cfg, sizes, pad in GEN:
    for dt in ["float32", "float64"]:
        gen = TASK_UTILS.build(dict(cfg))
        featmap_sizes = [tuple(s) for s in sizes]
        outs = {}
        for ws in [False, True]:
            pri = gen.grid_priors(featmap_sizes, dtype=DTYPES[dt], device="cpu", with_stride=ws)
            for i, p in enumerate(pri):
                outs[f"priors{'_stride' if ws else ''}.level{i}"] = p
        for i, f in enumerate(gen.valid_flags(featmap_sizes, tuple(pad), device="cpu")):
            outs[f"valid_flags.level{i}"] = f
        inputs = {}
        for i, (h, w) in enumerate(featmap_sizes):
            if h * w == 0:
                continue
            idx = torch.tensor(sorted({0, h * w - 1, (7 * i + 3) % (h * w), (h * w) // 2}), dtype=torch.int64)
            inputs[f"prior_idxs.level{i}"] = idx
            outs[f"sparse_priors.level{i}"] = gen.sparse_priors(idx, (h, w), i, dtype=DTYPES[dt], device="cpu")
        case(f"points_{tag}_{dt}", "MlvlPointGenerator", cfg,
             "gen = TASK_UTILS.build(config); gen.grid_priors(featmap_sizes, dtype, 'cpu', with_stride) "
             "for with_stride in (False, True); gen.valid_flags(featmap_sizes, pad_shape, 'cpu'); "
             "gen.sparse_priors(prior_idxs.level<i>, featmap_sizes[i], i, dtype, 'cpu')",
             {"featmap_sizes": sizes, "pad_shape": pad, "dtype": dt}, inputs, outs)

# ---- DistancePointBBoxCoder ----
g = torch.Generator().manual_seed(0)


def rand(*shape, lo=0.0, hi=1.0, dtype=torch.float32):
    return (torch.rand(*shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)


for dt in ["float32", "float64"]:
    d = DTYPES[dt]
    points = rand(12, 2, lo=0, hi=64, dtype=d)
    x1y1 = rand(12, 2, lo=-10, hi=50, dtype=d)
    wh = rand(12, 2, lo=0, hi=40, dtype=d)
    gts = torch.cat([x1y1, x1y1 + wh], -1)
    # a point outside its box (negative distances), a zero-area box, a point on a side
    gts[0] = torch.tensor([40.0, 40.0, 50.0, 60.0], dtype=d)
    points[0] = torch.tensor([10.0, 10.0], dtype=d)
    gts[1] = torch.tensor([5.0, 5.0, 5.0, 5.0], dtype=d)
    points[1] = torch.tensor([5.0, 5.0], dtype=d)
    points[2] = gts[2, :2].clone()
    for cfg in [{"type": "DistancePointBBoxCoder"}, {"type": "DistancePointBBoxCoder", "clip_border": False}]:
        coder = TASK_UTILS.build(dict(cfg))
        clip = cfg.get("clip_border", True)
        tag = "" if clip else "_noclip"
        if clip:
            for max_dis, eps in [(None, 0.1), (16, 0.01), (7.0, 0.1), (4, 0.0)]:
                out = coder.encode(points, gts, max_dis, eps)
                case(f"distance_encode_maxdis{max_dis}_eps{eps}_{dt}", "DistancePointBBoxCoder.encode", cfg,
                     "TASK_UTILS.build(config).encode(points, gt_bboxes, max_dis, eps)",
                     {"max_dis": max_dis, "eps": eps}, {"points": points, "gt_bboxes": gts}, {"distances": out})
            b_points = rand(2, 6, 2, lo=0, hi=64, dtype=d)
            b_gts = torch.cat([b_points - rand(2, 6, 2, lo=0, hi=9, dtype=d), b_points + rand(2, 6, 2, lo=0, hi=9, dtype=d)], -1)
            out = coder.encode(b_points, b_gts, 8, 0.01)
            case(f"distance_encode_batch_{dt}", "DistancePointBBoxCoder.encode", cfg,
                 "TASK_UTILS.build(config).encode(points, gt_bboxes, max_dis, eps)",
                 {"max_dis": 8, "eps": 0.01}, {"points": b_points, "gt_bboxes": b_gts}, {"distances": out})
        dist = rand(12, 4, lo=-3, hi=30, dtype=d)
        dist[3] = torch.tensor([float("nan"), 1.0, 2.0, 3.0], dtype=d)
        for ms in [None, [40, 50], [40, 50, 3]]:
            out = coder.decode(points, dist.clone(), ms)
            case(f"distance_decode{tag}_maxshape{'none' if ms is None else '_'.join(map(str, ms))}_{dt}",
                 "DistancePointBBoxCoder.decode", cfg,
                 "TASK_UTILS.build(config).decode(points, pred_bboxes, max_shape)",
                 {"max_shape": ms}, {"points": points, "pred_bboxes": dist}, {"decoded_bboxes": out})
        b_points = rand(3, 5, 2, lo=0, hi=64, dtype=d)
        b_dist = rand(3, 5, 4, lo=-3, hi=40, dtype=d)
        for ms in [None, [30, 45], [[30, 45], [64, 20], [10, 10]]]:
            out = coder.decode(b_points, b_dist.clone(), ms)
            case(f"distance_decode{tag}_batch_maxshape{'none' if ms is None else ('per_image' if isinstance(ms[0], list) else 'one')}_{dt}",
                 "DistancePointBBoxCoder.decode", cfg,
                 "TASK_UTILS.build(config).decode(points, pred_bboxes, max_shape)",
                 {"max_shape": ms}, {"points": b_points, "pred_bboxes": b_dist}, {"decoded_bboxes": out})
    empty = TASK_UTILS.build(dict(type="DistancePointBBoxCoder")).decode(points[:0], dist[:0], [40, 50])
    case(f"distance_decode_empty_{dt}", "DistancePointBBoxCoder.decode", {"type": "DistancePointBBoxCoder"},
         "TASK_UTILS.build(config).decode(points, pred_bboxes, max_shape)", {"max_shape": [40, 50]},
         {"points": points[:0], "pred_bboxes": dist[:0]}, {"decoded_bboxes": empty})


# ---- FCOSHead ----
def fcos_case(name, cfg, featmap_sizes, gts, dtype, gt_dtype):
    head = MODELS.build(dict(cfg, in_channels=32, feat_channels=32, stacked_convs=1))
    head.eval()
    seen = {}

    def recorder(key):
        def forward(pred, target, weight=None, avg_factor=None, **kw):
            seen[key] = dict(pred=pred.detach().clone(), target=target.detach().clone(),
                             weight=None if weight is None else weight.detach().clone(),
                             avg_factor=avg_factor)
            return pred.sum() * 0
        return forward

    for key in ["loss_cls", "loss_bbox", "loss_centerness"]:
        getattr(head, key).forward = recorder(key)
    b = len(gts)
    pg = torch.Generator().manual_seed(len(CASES))
    cls = [torch.randn(b, head.cls_out_channels, h, w, generator=pg, dtype=torch.float64).to(dtype) for h, w in featmap_sizes]
    box = [torch.rand(b, 4, h, w, generator=pg, dtype=torch.float64).mul(30).to(dtype) for h, w in featmap_sizes]
    ctr = [torch.randn(b, 1, h, w, generator=pg, dtype=torch.float64).to(dtype) for h, w in featmap_sizes]
    inst = [InstanceData(bboxes=torch.tensor(g[0], dtype=gt_dtype).reshape(-1, 4),
                         labels=torch.tensor(g[1], dtype=torch.int64)) for g in gts]
    metas = [dict(img_shape=(featmap_sizes[0][0] * head.strides[0], featmap_sizes[0][1] * head.strides[0]))] * b
    head.loss_by_feat(cls, box, ctr, inst, metas)
    points = head.prior_generator.grid_priors([tuple(s) for s in featmap_sizes], dtype=dtype, device="cpu")
    labels, bbox_targets = head.get_targets(points, inst)
    outs = {}
    for i, (l, t) in enumerate(zip(labels, bbox_targets)):
        outs[f"labels.level{i}"] = l
        outs[f"bbox_targets.level{i}"] = t
    outs["flatten_labels"] = seen["loss_cls"]["target"]
    outs["num_pos"] = torch.tensor(float(seen["loss_cls"]["avg_factor"]), dtype=torch.float64)
    if "loss_bbox" in seen:
        outs["pos_centerness_targets"] = seen["loss_bbox"]["weight"]
        outs["pos_decoded_target_preds"] = seen["loss_bbox"]["target"]
        outs["centerness_denorm"] = torch.as_tensor(seen["loss_bbox"]["avg_factor"]).detach().clone()
        assert torch.equal(seen["loss_centerness"]["target"], seen["loss_bbox"]["weight"])
    inputs = {}
    for j, g in enumerate(gts):
        inputs[f"gt_bboxes.img{j}"] = inst[j].bboxes
        inputs[f"gt_labels.img{j}"] = inst[j].labels
    case(name, "FCOSHead", cfg,
         "head = MODELS.build(config + in/feat_channels 32, stacked_convs 1); head.loss_by_feat(...) with "
         "its losses recording their inputs; head.get_targets(head.prior_generator.grid_priors(featmap_sizes, dtype), gts)",
         {"featmap_sizes": featmap_sizes, "dtype": str(dtype).replace("torch.", ""), "images": b}, inputs, outs)


FCOS_DEFAULT = {"type": "FCOSHead", "num_classes": 4, "strides": [8, 16, 32, 64, 128]}
FCOS_TRICKS = {"type": "FCOSHead", "num_classes": 3, "strides": [8, 16, 32],
               "regress_ranges": [[-1, 64], [64, 128], [128, 100000000.0]],
               "center_sampling": True, "center_sample_radius": 1.5, "norm_on_bbox": True,
               "centerness_on_reg": True}
FCOS_RADIUS = {"type": "FCOSHead", "num_classes": 2, "strides": [16, 32],
               "regress_ranges": [[-1, 48], [48, 100000000.0]], "center_sampling": True,
               "center_sample_radius": 2.5}
SIZES5 = [[16, 20], [8, 10], [4, 5], [2, 3], [1, 2]]
SIZES3 = [[12, 16], [6, 8], [3, 4]]
GTS_A = [
    ([[10, 12, 60, 50], [20, 20, 40, 40], [100, 8, 150, 120], [4, 60, 124, 126]], [0, 1, 2, 3]),
    ([], []),
]
GTS_B = [
    ([[12, 12, 44, 52]], [2]),
    # two equal-area boxes that overlap (ties: the first), a nested pair, a box edge on points
    ([[8, 8, 40, 40], [16, 16, 48, 48], [60, 10, 110, 80], [70, 20, 90, 50]], [0, 1, 2, 0]),
    ([[0, 0, 127, 95], [3.5, 5.25, 9.75, 11.5], [50, 50, 51, 52], [30, 60, 90, 94], [100, 4, 126, 30]],
     [1, 1, 0, 2, 2]),
]
for dt in [torch.float32, torch.float64]:
    tag = str(dt).replace("torch.", "")
    fcos_case(f"fcos_default_{tag}", FCOS_DEFAULT, SIZES5, GTS_A, dt, dt)
    fcos_case(f"fcos_center_sampling_norm_on_bbox_{tag}", FCOS_TRICKS, SIZES3, GTS_B, dt, dt)
fcos_case("fcos_radius_2_5_points_f32_gts_f64", FCOS_RADIUS, [[6, 8], [3, 4]], GTS_B[1:], torch.float32, torch.float64)
fcos_case("fcos_no_gt_at_all_float32", FCOS_DEFAULT, SIZES5, [([], []), ([], [])], torch.float32, torch.float32)

# ---- TaskAlignedAssigner ----
def tal_case(name, cfg, priors, decoded, scores, gt_boxes, gt_labels, alpha, beta):
    a = TASK_UTILS.build(dict(cfg))
    gt = InstanceData(bboxes=gt_boxes, labels=gt_labels)
    r = a.assign(InstanceData(priors=priors, bboxes=decoded, scores=scores), gt, None, alpha, beta)
    case(name, "TaskAlignedAssigner", cfg,
         "TASK_UTILS.build(config).assign(InstanceData(priors, bboxes=decoded, scores), InstanceData(bboxes=gt_bboxes, labels=gt_labels), None, alpha, beta)",
         {"alpha": alpha, "beta": beta},
         {"priors": priors, "decoded": decoded, "scores": scores, "gt_bboxes": gt_boxes, "gt_labels": gt_labels},
         {"gt_inds": r.gt_inds, "max_overlaps": r.max_overlaps, "labels": r.labels, "assign_metrics": r.assign_metrics})


tg = torch.Generator().manual_seed(7)
ys, xs = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
cx, cy = (xs.reshape(-1) + 0.5) * 8, (ys.reshape(-1) + 0.5) * 8
for dt in [torch.float32, torch.float64]:
    tag = str(dt).replace("torch.", "")
    priors = torch.stack([cx - 16, cy - 16, cx + 16, cy + 16], -1).to(dt)
    noise = (torch.rand(64, 4, generator=tg, dtype=torch.float64) - 0.5) * 12
    decoded = (priors.double() + noise).to(dt)
    scores = torch.rand(64, 4, generator=tg, dtype=torch.float64).to(dt)
    gts = torch.tensor([[5, 6, 40, 44], [30, 8, 62, 30], [12, 36, 28, 60], [44, 40, 60, 62]], dtype=dt)
    labels = torch.tensor([0, 2, 1, 3])
    for topk, (al, be) in [(13, (1, 6)), (3, (1, 6)), (9, (2, 4))]:
        tal_case(f"tal_topk{topk}_a{al}_b{be}_{tag}", {"type": "TaskAlignedAssigner", "topk": topk},
                 priors, decoded, scores, gts, labels, al, be)
    # identical ground truths (the first wins), a box with no prior centre inside, one gt, none
    tal_case(f"tal_duplicate_and_tiny_gts_{tag}", {"type": "TaskAlignedAssigner", "topk": 13}, priors, decoded, scores,
             torch.tensor([[5, 6, 40, 44], [5, 6, 40, 44], [9, 9, 11, 11], [20, 20, 52, 52]], dtype=dt),
             torch.tensor([1, 1, 0, 2]), 1, 6)
    tal_case(f"tal_one_gt_topk_over_priors_{tag}", {"type": "TaskAlignedAssigner", "topk": 100}, priors, decoded,
             scores, gts[:1], labels[:1], 1, 6)
    tal_case(f"tal_no_gt_{tag}", {"type": "TaskAlignedAssigner", "topk": 13}, priors, decoded, scores,
             gts[:0], labels[:0], 1, 6)

# ---- DynamicSoftLabelAssigner ----
def dsl_case(name, cfg, priors, decoded, scores, gt_boxes, gt_labels):
    a = TASK_UTILS.build(dict(cfg))
    r = a.assign(InstanceData(priors=priors, bboxes=decoded, scores=scores),
                 InstanceData(bboxes=gt_boxes, labels=gt_labels))
    case(name, "DynamicSoftLabelAssigner", cfg,
         "TASK_UTILS.build(config).assign(InstanceData(priors, bboxes=decoded, scores), InstanceData(bboxes=gt_bboxes, labels=gt_labels))",
         {}, {"priors": priors, "decoded": decoded, "scores": scores, "gt_bboxes": gt_boxes, "gt_labels": gt_labels},
         {"gt_inds": r.gt_inds, "max_overlaps": r.max_overlaps, "labels": r.labels})


dg = torch.Generator().manual_seed(11)
point_gen = TASK_UTILS.build(dict(type="MlvlPointGenerator", offset=0, strides=[8, 16, 32]))
for dt in [torch.float32, torch.float64]:
    tag = str(dt).replace("torch.", "")
    priors = torch.cat(point_gen.grid_priors([(8, 8), (4, 4), (2, 2)], dtype=dt, device="cpu", with_stride=True))
    n = priors.size(0)
    dist_ = (torch.rand(n, 4, generator=dg, dtype=torch.float64) * 2.5 + 0.2).to(dt) * priors[:, 2:3]
    decoded = torch.cat([priors[:, :2] - dist_[:, :2], priors[:, :2] + dist_[:, 2:]], -1)
    scores = torch.randn(n, 3, generator=dg, dtype=torch.float64).to(dt)
    gts = torch.tensor([[2, 3, 30, 28], [20, 10, 60, 50], [5, 34, 25, 62], [40, 44, 63, 63], [0, 0, 64, 64]], dtype=dt)
    labels = torch.tensor([0, 2, 1, 1, 0])
    # MMDetection raises for float64 predictions once a prior matches (its float32
    # max_overlaps takes no float64 IoU): those cases are float32 only.
    if dt == torch.float32:
        dsl_case(f"dsl_rtmdet_{tag}", {"type": "DynamicSoftLabelAssigner", "topk": 13}, priors, decoded, scores, gts, labels)
        dsl_case(f"dsl_radius2_iouw2_topk5_{tag}", {"type": "DynamicSoftLabelAssigner", "topk": 5,
                 "soft_center_radius": 2.0, "iou_weight": 2.0}, priors, decoded, scores, gts[:4], labels[:4])
        dsl_case(f"dsl_duplicate_gts_{tag}", {"type": "DynamicSoftLabelAssigner", "topk": 13}, priors, decoded, scores,
                 torch.tensor([[20, 10, 60, 50], [20, 10, 60, 50], [3, 3, 5, 5]], dtype=dt), torch.tensor([2, 1, 0]))
    dsl_case(f"dsl_no_candidate_{tag}", {"type": "DynamicSoftLabelAssigner", "topk": 13}, priors, decoded, scores,
             torch.tensor([[1, 1, 3, 3]], dtype=dt), torch.tensor([0]))
    dsl_case(f"dsl_no_gt_{tag}", {"type": "DynamicSoftLabelAssigner", "topk": 13}, priors, decoded, scores,
             gts[:0], labels[:0])

# ---- RTMDetHead and GFLHead ----
def instances(gts):
    return [InstanceData(bboxes=torch.tensor(g[0], dtype=torch.float32).reshape(-1, 4),
                         labels=torch.tensor(g[1], dtype=torch.int64)) for g in gts]


def head_inputs(cls, box, inst):
    inputs = {}
    for lvl, (c_, b_) in enumerate(zip(cls, box)):
        inputs[f"cls_scores.level{lvl}"] = c_
        inputs[f"bbox_preds.level{lvl}"] = b_
    for j, g in enumerate(inst):
        inputs[f"gt_bboxes.img{j}"] = g.bboxes
        inputs[f"gt_labels.img{j}"] = g.labels
    return inputs


def rtm_case(name, cfg, featmap_sizes, gts, metas):
    head = MODELS.build(dict(cfg, in_channels=32, feat_channels=32, stacked_convs=1))
    seen = {"cls": [], "bbox": []}
    one = torch.tensor(1.0, dtype=torch.float64)

    def rec_cls(pred, target, weight=None, avg_factor=None, **kw):
        seen["cls"].append((target[0].clone(), target[1].detach().clone(), weight.detach().clone(), avg_factor))
        return one.clone()

    def rec_bbox(pred, target, weight=None, avg_factor=None, **kw):
        seen["bbox"].append((target.detach().clone(), weight.detach().clone(), avg_factor))
        return one.clone()

    head.loss_cls.forward = rec_cls
    head.loss_bbox.forward = rec_bbox
    b = len(gts)
    pg = torch.Generator().manual_seed(100 + len(CASES))
    strides = head.prior_generator.strides
    cls = [torch.randn(b, cfg["num_classes"], h, w, generator=pg) for h, w in featmap_sizes]
    box = [torch.rand(b, 4, h, w, generator=pg).mul(2.5).add(0.3).mul(s[0]) for (h, w), s in zip(featmap_sizes, strides)]
    inst = instances(gts)
    out = head.loss_by_feat(cls, box, inst, metas)
    outs = {}
    for i, (lab, met, lw, af) in enumerate(seen["cls"]):
        assert af == 1.0
        outs[f"labels.level{i}"] = lab
        outs[f"assign_metrics.level{i}"] = met
        outs[f"label_weights.level{i}"] = lw
    pos_t = [t for t, _, _ in seen["bbox"]]
    pos_w = [w for _, w, _ in seen["bbox"]]
    if pos_t:
        outs["pos_bbox_targets"] = torch.cat(pos_t)
        outs["pos_bbox_weights"] = torch.cat(pos_w)
    # loss_by_feat divides each level's loss by its divisor: our losses return 1.
    cls_div = [1.0 / float(x) for x in out["loss_cls"]]
    outs["cls_avg_factor"] = torch.tensor(cls_div[0], dtype=torch.float32)
    bbox_div = [1.0 / float(x) for x in out["loss_bbox"] if float(x) != 0.0]
    if bbox_div:
        outs["bbox_avg_factor"] = torch.tensor(bbox_div[0], dtype=torch.float32)
    inputs = head_inputs(cls, box, inst)
    case(name, "RTMDetHead", cfg,
         "head = MODELS.build(config + in/feat_channels 32, stacked_convs 1); head.loss_by_feat(cls_scores, bbox_preds, gts, metas) "
         "with its two losses recording their inputs and returning 1",
         {"featmap_sizes": featmap_sizes, "images": b, "metas": [[list(m["img_shape"]), list(m["pad_shape"])] for m in metas]},
         inputs, outs)


RTM = {"type": "RTMDetHead", "num_classes": 3,
       "anchor_generator": {"type": "MlvlPointGenerator", "offset": 0, "strides": [8, 16, 32]},
       "bbox_coder": {"type": "DistancePointBBoxCoder"},
       "loss_cls": {"type": "QualityFocalLoss", "use_sigmoid": True, "beta": 2.0, "loss_weight": 1.0},
       "loss_bbox": {"type": "GIoULoss", "loss_weight": 2.0},
       "train_cfg": {"assigner": {"type": "DynamicSoftLabelAssigner", "topk": 13},
                     "allowed_border": -1, "pos_weight": -1, "debug": False}}
RTM_BORDER = json.loads(json.dumps(RTM))
RTM_BORDER["train_cfg"].update({"allowed_border": 0, "pos_weight": 2.0})
RTM_BORDER["train_cfg"]["assigner"].update({"topk": 5, "soft_center_radius": 2.5})
GTS_R = [
    ([[2, 3, 30, 28], [20, 10, 60, 50], [5, 34, 25, 62]], [0, 2, 1]),
    ([[40, 44, 63, 63], [0, 0, 64, 64], [30, 30, 33, 33], [10, 40, 50, 60]], [1, 0, 2, 2]),
    ([], []),
]
M = [{"img_shape": (64, 64), "pad_shape": (64, 64)}, {"img_shape": (50, 60), "pad_shape": (56, 64)},
     {"img_shape": (64, 64), "pad_shape": (64, 64)}]
rtm_case("rtmdet_default", RTM, [[8, 8], [4, 4], [2, 2]], GTS_R, M)
rtm_case("rtmdet_border0_posweight2_topk5", RTM_BORDER, [[8, 8], [4, 4], [2, 2]], GTS_R[:2], M[:2])

# ---- GFLHead ----
def gfl_case(name, cfg, featmap_sizes, gts, metas):
    head = MODELS.build(dict(cfg, in_channels=32, feat_channels=32, stacked_convs=1))
    seen = {"cls": [], "bbox": [], "dfl": []}
    one = torch.tensor(1.0, dtype=torch.float64)

    def rec(key):
        def forward(pred, target, weight=None, avg_factor=None, **kw):
            if key == "cls":
                seen[key].append((target[0].clone(), target[1].detach().clone(), weight.detach().clone(), float(avg_factor)))
            else:
                seen[key].append((pred.detach().clone(), target.detach().clone(), weight.detach().clone(), avg_factor))
            return one.clone()
        return forward

    head.loss_cls.forward = rec("cls")
    head.loss_bbox.forward = rec("bbox")
    head.loss_dfl.forward = rec("dfl")
    b = len(gts)
    pg = torch.Generator().manual_seed(200 + len(CASES))
    r = head.reg_max + 1
    cls = [torch.randn(b, cfg["num_classes"], h, w, generator=pg) for h, w in featmap_sizes]
    box = [torch.randn(b, 4 * r, h, w, generator=pg) for h, w in featmap_sizes]
    inst = instances(gts)
    out = head.loss_by_feat(cls, box, inst, metas)
    outs = {}
    for i, (lab, score, lw, af) in enumerate(seen["cls"]):
        outs[f"labels.level{i}"] = lab
        outs[f"scores.level{i}"] = score
        outs[f"label_weights.level{i}"] = lw
        outs["cls_avg_factor"] = torch.tensor(af, dtype=torch.float32)
    if seen["bbox"]:
        outs["pos_pred_boxes"] = torch.cat([p for p, _, _, _ in seen["bbox"]])
        outs["pos_target_boxes"] = torch.cat([t for _, t, _, _ in seen["bbox"]])
        outs["pos_weights"] = torch.cat([w for _, _, w, _ in seen["bbox"]])
        outs["pos_corner_targets"] = torch.cat([t for _, t, _, _ in seen["dfl"]])
        div = [1.0 / float(x) for x in out["loss_bbox"] if float(x) != 0.0]
        outs["bbox_avg_factor"] = torch.tensor(div[0], dtype=torch.float32)
    inputs = head_inputs(cls, box, inst)
    case(name, "GFLHead", cfg,
         "head = MODELS.build(config + in/feat_channels 32, stacked_convs 1); head.loss_by_feat(cls_scores, bbox_preds, gts, metas) "
         "with its three losses recording their inputs and returning 1",
         {"featmap_sizes": featmap_sizes, "images": b, "metas": [[list(m["img_shape"]), list(m["pad_shape"])] for m in metas]},
         inputs, outs)


GFL = {"type": "GFLHead", "num_classes": 3, "reg_max": 8,
       "anchor_generator": {"type": "AnchorGenerator", "ratios": [1.0], "octave_base_scale": 8,
                            "scales_per_octave": 1, "strides": [8, 16, 32]},
       "loss_cls": {"type": "QualityFocalLoss", "use_sigmoid": True, "beta": 2.0, "loss_weight": 1.0},
       "loss_dfl": {"type": "DistributionFocalLoss", "loss_weight": 0.25},
       "loss_bbox": {"type": "GIoULoss", "loss_weight": 2.0},
       "train_cfg": {"assigner": {"type": "ATSSAssigner", "topk": 9}, "allowed_border": -1,
                     "pos_weight": -1, "debug": False}}
gfl_case("gfl_reg_max8", GFL, [[8, 8], [4, 4], [2, 2]], GTS_R, M)

# ---- TOODHead (after the initial epochs) ----
from mmengine import MessageHub  # noqa: E402

MessageHub.get_instance("gen_point_cases").update_info("epoch", 10)


def tood_case(name, cfg, featmap_sizes, gts, metas):
    head = MODELS.build(dict(cfg, in_channels=32, feat_channels=32, stacked_convs=1))
    b = len(gts)
    pg = torch.Generator().manual_seed(300 + len(CASES))
    anchor_list, valid_list = head.get_anchors([tuple(s) for s in featmap_sizes], metas, device="cpu")
    anchors = torch.cat(anchor_list[0])
    n = anchors.size(0)
    ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    half = (anchors[:, 2:] - anchors[:, :2]) / 2
    jitter = torch.rand(b, n, 4, generator=pg) * 0.8 + 0.6
    decoded = torch.cat([ctr - half * jitter[..., :2], ctr + half * jitter[..., 2:]], -1)
    scores = torch.rand(b, n, cfg["num_classes"], generator=pg)
    inst = instances(gts)
    labels, label_weights, bbox_targets, metrics = head.get_targets(
        scores, decoded, anchor_list, valid_list, inst, metas)[1:]
    outs = {}
    for i in range(len(labels)):
        outs[f"labels.level{i}"] = labels[i]
        outs[f"label_weights.level{i}"] = label_weights[i]
        outs[f"bbox_targets.level{i}"] = bbox_targets[i]
        outs[f"alignment_metrics.level{i}"] = metrics[i]
    inputs = {"decoded": decoded, "scores": scores}
    for j, g in enumerate(inst):
        inputs[f"gt_bboxes.img{j}"] = g.bboxes
        inputs[f"gt_labels.img{j}"] = g.labels
    case(name, "TOODHead", cfg,
         "head = MODELS.build(config + in/feat_channels 32, stacked_convs 1); epoch 10 in the MessageHub; "
         "head.get_targets(scores, decoded, *head.get_anchors(featmap_sizes, metas), gts, metas)",
         {"featmap_sizes": featmap_sizes, "images": b, "metas": [[list(m["img_shape"]), list(m["pad_shape"])] for m in metas]},
         inputs, outs)


TOOD = {"type": "TOODHead", "num_classes": 3, "anchor_type": "anchor_free",
        "anchor_generator": {"type": "AnchorGenerator", "ratios": [1.0], "octave_base_scale": 8,
                             "scales_per_octave": 1, "strides": [8, 16, 32]},
        "bbox_coder": {"type": "DeltaXYWHBBoxCoder", "target_means": [0.0, 0.0, 0.0, 0.0],
                       "target_stds": [0.1, 0.1, 0.2, 0.2]},
        "initial_loss_cls": {"type": "FocalLoss", "use_sigmoid": True, "activated": True, "gamma": 2.0,
                             "alpha": 0.25, "loss_weight": 1.0},
        "loss_cls": {"type": "QualityFocalLoss", "use_sigmoid": True, "activated": True, "beta": 2.0, "loss_weight": 1.0},
        "loss_bbox": {"type": "GIoULoss", "loss_weight": 2.0},
        "train_cfg": {"initial_epoch": 4, "initial_assigner": {"type": "ATSSAssigner", "topk": 9},
                      "assigner": {"type": "TaskAlignedAssigner", "topk": 13}, "alpha": 1, "beta": 6,
                      "allowed_border": -1, "pos_weight": -1, "debug": False}}
tood_case("tood_alignment", TOOD, [[8, 8], [4, 4], [2, 2]], GTS_R, M)

assert not CALLED, CALLED
counts = {}
for c in CASES:
    counts[c["family"]] = counts.get(c["family"], 0) + 1
import mmcv  # noqa: E402
import mmengine  # noqa: E402

out = {"generator": {"script": "tests/data/gen_point_cases.py", "mmdet": mmdet.__version__,
                     "mmengine": mmengine.__version__, "mmcv": mmcv.__version__ + " (mmcv-lite wheel, ops stubbed)",
                     "torch": torch.__version__, "python": platform.python_version(), "device": "cpu",
                     "torch_num_threads": 1},
       "counts": counts, "cases": CASES}
with open(sys.argv[1], "w") as f:
    json.dump(out, f, indent=None, separators=(",", ":"))
print(counts)
