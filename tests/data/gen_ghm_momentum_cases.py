"""Reference cases of MMDetection 3.3's GHMC and GHMR with momentum over a sequence of calls on
one loss object, in float64 and float32: ghm_momentum_cases.json.

They pin down what the momentum state does for every input dtype: MMDetection's `acc_sum` is a
float32 buffer (`torch.zeros(bins)`), so `acc_sum[i] = mmt * acc_sum[i] + (1 - mmt) * num_in_bin`
runs as two float32 ops (each Python float rounded to float32 first) and `tot / acc_sum[i]` as a
float32 reciprocal times float32(tot), whatever the dtype of pred; GHMR's `tot` is
`label_weight.float().sum()`, a float32 sum. Momenta 0.7 (not a float32 value: the product's
rounding shows from the second call on) and 0.75, label weights of 0/1 and fractional.

The two modules are MMDetection 3.3.0's own files, unmodified, from the installed wheel:
`mmdet/models/losses/ghm_loss.py` and the `utils.py` it imports (`weight_reduce_loss`), loaded
without running the packages' __init__ files; the only stand-in is `mmdet.registry.MODELS`,
whose `register_module` decorator returns the class unchanged (the classes are built directly
with the config's keyword arguments, as `MODELS.build` would). Layout: as mmdet_cases.json
(../shared/golden/README.md), every case a sequence of 3 calls with `state_after`.

    pip install torch==2.11.0
    pip install --no-deps mmdet==3.3.0
    python tests/data/gen_ghm_momentum_cases.py tests/data/ghm_momentum_cases.json
"""
import importlib.util
import json
import os
import platform
import sys
import types

import torch

torch.set_num_threads(1)


def mmdet_losses_dir():
    spec = importlib.util.find_spec("mmdet")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        sys.exit("mmdet is not installed: pip install --no-deps mmdet==3.3.0")
    return os.path.join(list(spec.submodule_search_locations)[0], "models", "losses")


def load_modules():
    losses = mmdet_losses_dir()  # before the stand-in packages below shadow the real one
    registry = types.ModuleType("mmdet.registry")

    class Models:
        def register_module(self, *args, **kwargs):
            return lambda cls: cls

    registry.MODELS = Models()
    for name in ["mmdet", "mmdet.models", "mmdet.models.losses"]:
        package = types.ModuleType(name)
        package.__path__ = []
        sys.modules[name] = package
    sys.modules["mmdet.registry"] = registry

    def load(name, file):
        spec = importlib.util.spec_from_file_location(name, os.path.join(losses, file))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    load("mmdet.models.losses.utils", "utils.py")
    return load("mmdet.models.losses.ghm_loss", "ghm_loss.py")


def tensor(t):
    t = t.detach()
    data = t.flatten().tolist()
    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
            "data": [float(x) for x in data] if t.is_floating_point() else data}


def main(out):
    ghm = load_modules()
    torch.manual_seed(2026)
    # (loss, config, pred shape, dtype, fractional label weights)
    plans = [
        ("GHMR", dict(mu=0.02, bins=10, momentum=0.7), (120, 4), torch.float64, False),
        ("GHMR", dict(mu=0.02, bins=10, momentum=0.7), (120, 4), torch.float64, True),
        ("GHMR", dict(mu=0.02, bins=10, momentum=0.75, reduction="none"), (120, 4), torch.float64, True),
        ("GHMR", dict(mu=0.02, bins=10, momentum=0.7), (120, 4), torch.float32, True),
        ("GHMC", dict(bins=30, momentum=0.7, use_sigmoid=True), (100, 8), torch.float64, False),
        ("GHMC", dict(bins=10, momentum=0.3, use_sigmoid=True, reduction="none"), (150, 6), torch.float64, True),
        ("GHMC", dict(bins=30, momentum=0.7, use_sigmoid=True), (100, 8), torch.float32, False),
    ]
    cases = []
    for loss_name, cfg, shape, dtype, fractional in plans:
        loss = getattr(ghm, loss_name)(**cfg)
        sequence = []
        for _ in range(3):
            pred = (torch.randn(shape, dtype=dtype) * (0.2 if loss_name == "GHMR" else 2.0))
            pred.requires_grad_(True)
            if loss_name == "GHMR":
                target = torch.randn(shape, dtype=dtype) * 0.2
            else:
                target = (torch.rand(shape) < 0.1).to(dtype)
            label_weight = (torch.rand(shape) < 0.8).to(dtype)
            if fractional:
                label_weight = label_weight * torch.rand(shape, dtype=dtype)
            result = loss(pred, target, label_weight)
            (grad,) = torch.autograd.grad(result.sum(), pred)
            sequence.append({
                "inputs": {"pred": tensor(pred), "target": tensor(target),
                           "label_weight": tensor(label_weight)},
                "outputs": {"loss": tensor(result), "grad_pred": tensor(grad)},
                "state_after": {"acc_sum": tensor(loss.acc_sum)},
            })
        dt = str(dtype).replace("torch.", "")
        reduction = cfg.get("reduction", "mean")
        name = (f"{loss_name.lower()}_bins{cfg['bins']}_mom{cfg['momentum']}_"
                f"{'frac' if fractional else 'mask'}_{reduction}_{dt}_seq3")
        cases.append({
            "name": name, "loss": loss_name, "config": dict(type=loss_name, **cfg),
            "call": {"reduction_override": None, "avg_factor": None,
                     "label_weight": "inputs.label_weight",
                     "python": "loss(pred, target, label_weight)"},
            "inputs": sequence[0]["inputs"], "outputs": sequence[0]["outputs"],
            "sequence": sequence,
        })
    counts = {}
    for c in cases:
        counts[c["loss"]] = counts.get(c["loss"], 0) + 1
    doc = {"generator": {"torch": torch.__version__, "mmdet": "3.3.0",
                         "python": platform.python_version(),
                         "script": "tests/data/gen_ghm_momentum_cases.py"},
           "counts": counts, "cases": cases, "error_cases": []}
    with open(out, "w") as f:
        json.dump(doc, f)
    print(f"{len(cases)} cases written to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ghm_momentum_cases.json")
