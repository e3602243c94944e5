# The two commands of the README. Both set everything up first (idempotent, fast when done).
.PHONY: setup profile bench-dist test golden train train-dist gpu-check lint sanitize

setup:
	@bash scripts/setup.sh

# The main job: fused against unfused, side by side, on every device present.
profile: setup
	cargo bench --bench profile
	cargo bench --bench targets

# All-reduce latency and throughput of tch_detloss::dist against torch.distributed (Python), on
# Gloo with 2 local ranks, in one run: a Markdown table and target/dist-bench/report.json.
bench-dist: setup
	cargo bench --bench dist

# All tests (no GPU needed; tests/dist.rs runs its ranks on 127.0.0.1), the check that the c10d
# shim defines no gloo symbol, the emulated device's self-test, the README's dependent crate, plus
# the golden runner's report on every case (cases of losses not shipped yet are listed, not run),
# and a short training run of every head of the training example that must learn (`--check`),
# ATSS's and RTMDet's (batch norm) also data-parallel on 2 local ranks.
test: setup
	cargo test --release
	sh scripts/check-gloo-syms.sh
	bash scripts/emu-sanitize.sh check
	cargo run --release -p dependent
	cargo run --release --example golden -- tests/data/mmdet_cases.json
	cargo run --release --example golden -- tests/data/loss_cases.json
	cargo build --release --example train
	for h in atss gfl fcos rtmdet tood; do target/release/examples/train --head $$h --check || exit 1; done
	for h in atss rtmdet; do GLOO_SOCKET_IFNAME=lo .venv/bin/torchrun --standalone --nproc-per-node 2 --no-python target/release/examples/train --head $$h --check || exit 1; done

golden: setup
	cargo run --release --example golden -- tests/data/mmdet_cases.json
	cargo run --release --example golden -- tests/data/loss_cases.json

# Trains a detector on generated shapes (fused losses; HEAD=atss, gfl, fcos, rtmdet or tood,
# ARGS for more options): metrics.json and loss.png in target/train_$(HEAD).
HEAD ?= atss
train: setup
	cargo run --release --example train -- --head $(HEAD) $(ARGS)

# The same, data-parallel on 2 local ranks under torchrun (Gloo; add ARGS="--device cuda" for
# NCCL on 2 GPUs): each rank trains on its half of every batch, rank 0 writes. Gloo talks over
# the loopback interface (one machine).
train-dist: setup
	cargo build --release --example train
	GLOO_SOCKET_IFNAME=lo .venv/bin/torchrun --standalone --nproc-per-node 2 --no-python target/release/examples/train --head $(HEAD) $(ARGS)

# Builds the bundle that scripts/gpu-check.sh runs on a GPU machine without Rust.
gpu-check: setup
	bash scripts/gpu-check.sh build

# The emulated device's self-test (every entry point of kernels/kernels.cu against a serial
# loop, with exact-size buffers) under AddressSanitizer and UndefinedBehaviorSanitizer.
sanitize: setup
	bash scripts/emu-sanitize.sh asan

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
