"""Reference cases of MMDetection 3.3's point priors and distance coder: point_cases.json.

MlvlPointGenerator (grid_priors with and without stride, valid_flags, sparse_priors) and
DistancePointBBoxCoder (encode = bbox2distance with max_dis and eps, decode = distance2bbox with
max_shape as one image, per image of a batch, or none), computed by the real, unmodified
MMDetection 3.3.0 from its wheel, imported as for pipeline_cases.json (README.md): mmcv from
mmcv-lite 2.1.0 with mmcv.ops served by stubs that raise if called, mmdet.models as a bare package
so that only mmdet.models.task_modules (whose __init__ registers every prior generator and coder)
runs; objects built with mmdet.registry.TASK_UTILS.build from their config dicts.

    pip install --no-deps mmdet==3.3.0 mmcv-lite==2.1.0 mmengine==0.10.7
    pip install numpy scipy addict pyyaml rich termcolor yapf opencv-python-headless matplotlib \
        shapely pycocotools terminaltables six tqdm
    python tests/data/gen_point_cases.py tests/data/point_cases.json
"""
import importlib
import importlib.abc
import importlib.machinery
import json
import math
import platform
import sys
import types

import torch

torch.set_num_threads(1)

CALLED = []


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def stub(*a, **k):
            CALLED.append(f"{self.__name__}.{name}")
            raise RuntimeError(f"stub {self.__name__}.{name} called")

        return stub


class _OpsFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "mmcv.ops" or name.startswith("mmcv.ops."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _StubModule(spec.name)
        m.__path__ = []
        return m

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _OpsFinder())
import mmdet  # noqa: E402  (its version checks run)

for bare in ["mmdet.models"]:
    pkg = types.ModuleType(bare)
    pkg.__path__ = [mmdet.__path__[0] + "/" + bare.split(".", 1)[1].replace(".", "/")]
    sys.modules[bare] = pkg
importlib.import_module("mmdet.models.task_modules")
from mmdet.registry import TASK_UTILS  # noqa: E402

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
