"""PyTorch side of `cargo bench --bench profile -- --pytorch`: MMDetection 3.3's loss code timed in
PyTorch eager mode and under torch.compile, on the inputs the profile command wrote.

The loss functions below are MMDetection 3.3.0's (mmdet/models/losses/utils.py, focal_loss.py,
gfocal_loss.py, varifocal_loss.py, iou_loss.py, smooth_l1_loss.py), written out op for op so
that this file needs nothing beyond torch (MMDetection's package imports mmcv's compiled ops,
which mmcv-lite does not have). MMDetection is Copyright (c) OpenMMLab, Apache License 2.0.

Usage: python pytorch_losses.py MANIFEST.json  (written by the profile command); prints one JSON
object per case on stdout.
"""

import json
import struct
import sys
import time

import torch
import torch.nn.functional as F

# ---- mmdet/models/losses/utils.py


def reduce_loss(loss, reduction):
    reduction_enum = F._Reduction.get_enum(reduction)
    if reduction_enum == 0:
        return loss
    elif reduction_enum == 1:
        return loss.mean()
    elif reduction_enum == 2:
        return loss.sum()


def weight_reduce_loss(loss, weight=None, reduction='mean', avg_factor=None):
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        loss = reduce_loss(loss, reduction)
    else:
        if reduction == 'mean':
            eps = torch.finfo(torch.float32).eps
            loss = loss.sum() / (avg_factor + eps)
        elif reduction != 'none':
            raise ValueError('avg_factor can not be used with reduction="sum"')
    return loss


# ---- focal_loss.py (the path MMDetection's FocalLoss takes on the CPU)


def py_sigmoid_focal_loss(pred, target, weight=None, gamma=2.0, alpha=0.25, reduction='mean',
                          avg_factor=None):
    pred_sigmoid = pred.sigmoid()
    target = target.type_as(pred)
    pt = (1 - pred_sigmoid) * target + pred_sigmoid * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction='none') * focal_weight
    if weight is not None:
        if weight.shape != loss.shape:
            if weight.size(0) == loss.size(0):
                weight = weight.view(-1, 1)
            else:
                assert weight.numel() == loss.numel()
                weight = weight.view(loss.size(0), -1)
        assert weight.ndim == loss.ndim
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


def focal_loss(pred, labels, weight, avg_factor, gamma=2.0, alpha=0.25, loss_weight=1.0):
    # FocalLoss.forward on the CPU: one-hot labels with the background column dropped.
    num_classes = pred.size(1)
    target = F.one_hot(labels, num_classes=num_classes + 1)[:, :num_classes]
    return loss_weight * py_sigmoid_focal_loss(pred, target, weight, gamma, alpha, 'mean', avg_factor)


# ---- iou_loss.py, smooth_l1_loss.py


def bbox_overlaps_giou_aligned(bboxes1, bboxes2, eps=1e-6):
    area1 = (bboxes1[..., 2] - bboxes1[..., 0]) * (bboxes1[..., 3] - bboxes1[..., 1])
    area2 = (bboxes2[..., 2] - bboxes2[..., 0]) * (bboxes2[..., 3] - bboxes2[..., 1])
    lt = torch.max(bboxes1[..., :2], bboxes2[..., :2])
    rb = torch.min(bboxes1[..., 2:], bboxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - overlap
    enclosed_lt = torch.min(bboxes1[..., :2], bboxes2[..., :2])
    enclosed_rb = torch.max(bboxes1[..., 2:], bboxes2[..., 2:])
    eps = union.new_tensor([eps])
    union = torch.max(union, eps)
    ious = overlap / union
    enclose_wh = (enclosed_rb - enclosed_lt).clamp(min=0)
    enclose_area = enclose_wh[..., 0] * enclose_wh[..., 1]
    enclose_area = torch.max(enclose_area, eps)
    return ious - (enclose_area - union) / enclose_area


def giou_loss(pred, target, weight, avg_factor, loss_weight=1.0):
    # GIoULoss.forward: the zero-weight short-cut, the (N, 4) weight averaged, then giou_loss.
    if weight is not None and not torch.any(weight > 0):
        return (pred * weight).sum()
    if weight is not None and weight.dim() > 1:
        weight = weight.mean(-1)
    loss = 1 - bbox_overlaps_giou_aligned(pred, target)
    return loss_weight * weight_reduce_loss(loss, weight, 'mean', avg_factor)


def smooth_l1_loss(pred, target, weight, avg_factor, beta=1.0, loss_weight=1.0):
    if weight is not None and not torch.any(weight > 0):
        return (pred * weight).sum()
    diff = torch.abs(pred - target)
    loss = torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
    return loss_weight * weight_reduce_loss(loss, weight, 'mean', avg_factor)


def l1_loss(pred, target, weight, avg_factor, loss_weight=1.0):
    if weight is not None and not torch.any(weight > 0):
        return (pred * weight).sum()
    loss = torch.abs(pred - target)
    return loss_weight * weight_reduce_loss(loss, weight, 'mean', avg_factor)


LOSSES = {
    'FocalLoss': lambda cfg: (lambda p, t, w, a: focal_loss(
        p, t, w, a, cfg.get('gamma', 2.0), cfg.get('alpha', 0.25), cfg.get('loss_weight', 1.0))),
    'GIoULoss': lambda cfg: (lambda p, t, w, a: giou_loss(p, t, w, a, cfg.get('loss_weight', 1.0))),
    'SmoothL1Loss': lambda cfg: (lambda p, t, w, a: smooth_l1_loss(
        p, t, w, a, cfg.get('beta', 1.0), cfg.get('loss_weight', 1.0))),
    'L1Loss': lambda cfg: (lambda p, t, w, a: l1_loss(p, t, w, a, cfg.get('loss_weight', 1.0))),
}

# ---- inputs: safetensors files read without the safetensors package

DTYPES = {'F32': torch.float32, 'F64': torch.float64, 'F16': torch.float16, 'BF16': torch.bfloat16,
          'I64': torch.int64, 'I32': torch.int32, 'U8': torch.uint8, 'BOOL': torch.bool}


def read_safetensors(path):
    with open(path, 'rb') as f:
        data = f.read()
    (n,) = struct.unpack('<Q', data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == '__metadata__':
            continue
        lo, hi = meta['data_offsets']
        buf = bytearray(data[base + lo:base + hi])
        out[name] = torch.frombuffer(buf, dtype=DTYPES[meta['dtype']]).reshape(meta['shape']).clone()
    return out


def median_ms(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    m = len(times) // 2
    return times[m] if len(times) % 2 else 0.5 * (times[m - 1] + times[m])


def run_case(case, warmup, reps, compile_ok):
    t = read_safetensors(case['inputs'])
    pred, target = t['pred'], t['target']
    weight = t.get('weight')
    avg = t['avg_factor'].reshape(()) if 'avg_factor' in t else None
    if case['type'] not in LOSSES:
        return {'loss': case['name'], 'eager_ms': None, 'compiled_ms': None, 'note': 'not ported'}
    fn = LOSSES[case['type']](case['config'])

    def step(f):
        def go():
            p = pred.detach().requires_grad_(True)
            f(p, target, weight, avg).backward()
        return go

    result = {'loss': case['name'], 'eager_ms': median_ms(step(fn), warmup, reps), 'compiled_ms': None}
    if compile_ok:
        try:
            compiled = torch.compile(fn)
            t0 = time.perf_counter()
            step(compiled)()
            result['compile_s'] = time.perf_counter() - t0
            result['compiled_ms'] = median_ms(step(compiled), warmup, reps)
        except Exception as e:  # torch.compile where it works on the device
            result['note'] = f'torch.compile failed: {type(e).__name__}: {e}'[:300]
    return result


def main():
    manifest = json.load(open(sys.argv[1]))
    torch.set_num_threads(manifest.get('threads', torch.get_num_threads()))
    for case in manifest['cases']:
        print(json.dumps(run_case(case, manifest['warmup'], manifest['reps'], manifest.get('compile', True))),
              flush=True)


if __name__ == '__main__':
    main()
