//! Evaluation on held-out images: MMDetection's dense-head test-time path (the head's scores, the
//! top 1,000 (prior, class) pairs above 0.05 per image, their decoded boxes, class-wise NMS at
//! IoU 0.6, at most 100 detections), then recall and average precision at IoU 0.5.

use tch::{Kind, Tensor};

/// One image's detections: `(D, 4)` boxes, `(D,)` scores, `(D,)` labels, on the CPU.
pub struct Detections {
    pub boxes: Tensor,
    pub scores: Tensor,
    pub labels: Tensor,
}

fn iou_matrix(a: &Tensor, b: &Tensor) -> Tensor {
    tch_detloss::task_modules::bbox_overlaps(a, b, false).expect("boxes are (n, 4)")
}

/// Greedy NMS per class over detections sorted by score (a host loop; evaluation only).
fn nms(boxes: &Tensor, scores: &Tensor, labels: &Tensor, iou_thr: f64, max_det: i64) -> Vec<i64> {
    let order = scores.argsort(0, true);
    let (b, l) = (
        boxes.index_select(0, &order),
        labels.index_select(0, &order),
    );
    let ious =
        Vec::<f32>::try_from(iou_matrix(&b, &b).to_kind(Kind::Float).flatten(0, -1)).unwrap();
    let lab = Vec::<i64>::try_from(&l).unwrap();
    let ord = Vec::<i64>::try_from(&order).unwrap();
    let n = lab.len();
    let mut removed = vec![false; n];
    let mut keep = Vec::new();
    for i in 0..n {
        if removed[i] {
            continue;
        }
        keep.push(ord[i]);
        if keep.len() as i64 >= max_det {
            break;
        }
        for j in i + 1..n {
            if lab[j] == lab[i] && ious[i * n + j] > iou_thr as f32 {
                removed[j] = true;
            }
        }
    }
    keep
}

/// Detections of each image from a head's test-time scores `(B, N, C)` and decoded boxes
/// `(B, N, 4)`.
pub fn detect(scores: &Tensor, boxes: &Tensor) -> Vec<Detections> {
    let (b, _, c) = (scores.size()[0], scores.size()[1], scores.size()[2]);
    let scores = scores.to_device(tch::Device::Cpu);
    let boxes = boxes.to_device(tch::Device::Cpu);
    (0..b)
        .map(|i| {
            let s = scores.get(i).flatten(0, -1);
            let k = s.size()[0].min(1000);
            let (top, idx) = s.topk(k, 0, true, true);
            let keep = top.gt(0.05);
            let (top, idx) = (top.masked_select(&keep), idx.masked_select(&keep));
            let anchor = idx.divide_scalar_mode(c, "floor");
            let label = idx.remainder(c);
            let bx = boxes.get(i).index_select(0, &anchor);
            let kept = Tensor::from_slice(&nms(&bx, &top, &label, 0.6, 100));
            Detections {
                boxes: bx.index_select(0, &kept),
                scores: top.index_select(0, &kept),
                labels: label.index_select(0, &kept),
            }
        })
        .collect()
}

/// Recall and mean average precision (all-point interpolation, per class) at IoU 0.5.
pub fn recall_and_map(
    dets: &[Detections],
    gt_boxes: &[Tensor],
    gt_labels: &[Tensor],
    num_classes: i64,
) -> (f64, f64) {
    let mut found = 0usize;
    let mut total = 0usize;
    let mut aps = Vec::new();
    for class in 0..num_classes {
        // (score, true positive) of every detection of this class, and the class's gt count.
        let mut scored: Vec<(f32, bool)> = Vec::new();
        let mut n_gt = 0usize;
        for (d, (gb, gl)) in dets.iter().zip(gt_boxes.iter().zip(gt_labels)) {
            let gmask = gl.eq(class);
            let g = gb.index_select(0, &gmask.nonzero().view([-1]));
            n_gt += g.size()[0] as usize;
            let dmask = d.labels.eq(class).nonzero().view([-1]);
            let (db, ds) = (
                d.boxes.index_select(0, &dmask),
                d.scores.index_select(0, &dmask),
            );
            let ds = Vec::<f32>::try_from(&ds).unwrap();
            let mut matched = vec![false; g.size()[0] as usize];
            if g.size()[0] > 0 && !ds.is_empty() {
                let ious = iou_matrix(&db, &g);
                let n_g = g.size()[0] as usize;
                let iv = Vec::<f32>::try_from(ious.to_kind(Kind::Float).flatten(0, -1)).unwrap();
                // Detections arrive sorted by score; each takes its best unmatched gt.
                for (k, &s) in ds.iter().enumerate() {
                    let best = (0..n_g)
                        .filter(|&j| !matched[j])
                        .max_by(|&a, &b| iv[k * n_g + a].total_cmp(&iv[k * n_g + b]));
                    let tp = best.is_some_and(|j| iv[k * n_g + j] >= 0.5);
                    if let (true, Some(j)) = (tp, best) {
                        matched[j] = true;
                    }
                    scored.push((s, tp));
                }
            } else {
                scored.extend(ds.iter().map(|&s| (s, false)));
            }
            found += matched.iter().filter(|&&m| m).count();
        }
        total += n_gt;
        if n_gt == 0 {
            continue;
        }
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        let (mut tp, mut fp) = (0.0, 0.0);
        let mut points = Vec::new();
        for (_, t) in &scored {
            if *t {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            points.push((tp / n_gt as f64, tp / (tp + fp)));
        }
        // All-point interpolation: precision made monotone from the right.
        for i in (0..points.len().saturating_sub(1)).rev() {
            points[i].1 = points[i].1.max(points[i + 1].1);
        }
        let mut ap = 0.0;
        let mut prev_r = 0.0;
        for &(r, p) in &points {
            ap += (r - prev_r) * p;
            prev_r = r;
        }
        aps.push(ap);
    }
    let recall = if total == 0 {
        0.0
    } else {
        found as f64 / total as f64
    };
    let map = if aps.is_empty() {
        0.0
    } else {
        aps.iter().sum::<f64>() / aps.len() as f64
    };
    (recall, map)
}
