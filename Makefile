# rollfleet developer entry points. `make run` and `make test` create the venv they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
JOB    ?= examples/countdown.yaml

.PHONY: run test lint crds clean bench-async bench-trl bench-credit bench-bard bench-ravr bench-palette bench-fusedkv bench-nezha bench-qagent bench-recgpt bench-affinity bench-reward bench-simulate bench-faults bench-soak bench-prefix bench-cpu images dashboards-check

# torch comes from pip (the CPU wheel this machine keeps on disk, which uv does not look
# for); uv installs the rest, with the same versions as pip, in half pip's time. Bytecode
# is compiled once here: with PYTHONDONTWRITEBYTECODE set, as on this machine, every
# process of every test would otherwise compile Ray, transformers and the rest again.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0 uv==0.13.9
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)  ## train the tiny model on the default job, every service a local process
	$(BIN)/rollfleet run $(JOB)

# Three test processes on the two cores, a test file each at a time: much of the suite
# waits (on the operator's timers, on NATS, on Ray and child processes), so the others'
# CPU work fills the gaps (four were slower: 12 m 24 s against 10 m 21 s). The 15 slowest
# tests are listed at the end: the suite's budget is 12 minutes.
test: $(STAMP) lint  ## unit, service and end-to-end tests
	$(BIN)/python -m compileall -q src services operator
	$(BIN)/python -m pytest -q -n 3 --dist loadfile --durations=15

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench-async: $(STAMP)  ## asynchronous vs synchronous training, side by side (~15 min; benchmarks/RESULTS.md)
	$(BIN)/python benchmarks/async_speedup.py

bench-credit: $(STAMP)  ## attention-based credit against GRPO and random credit, 3 seeds (~35 min; benchmarks/RESULTS.md)
	$(BIN)/python benchmarks/attention_credit.py

bench-bard: $(STAMP)  ## BARD: length against budget, accuracy by budget, multiplicative vs additive reward (~15 min)
	$(BIN)/python benchmarks/bard.py

bench-ravr: $(STAMP)  ## RAVR against GRPO on a split the warmed-up model rarely solves, 3 seeds (~40 min)
	$(BIN)/python benchmarks/ravr.py

bench-palette: $(STAMP)  ## Reasoning Palette: strategies behind latents, latent pass@8, RL against GRPO, 3 seeds (~25 min)
	$(BIN)/python benchmarks/palette.py

bench-fusedkv: $(STAMP)  ## FusedKV, Lite, Lite-Rev and vanilla: pretraining perplexity, cache bytes, decode speed; RL on FusedKV
	$(BIN)/python benchmarks/fusedkv.py

bench-nezha: $(STAMP)  ## NEZHA against autoregressive beam search: HR@10, invalid items, latency; RL on the draft head (~15 min)
	$(BIN)/python benchmarks/nezha.py

bench-qagent: $(STAMP)  ## QAgent: Stage-1 against Stage-2 agents, retrieval hit rate and a swapped reader, 3 seeds (~60 min)
	$(BIN)/python benchmarks/qagent.py

bench-recgpt: $(STAMP)  ## RecGPT-V2: SFT against GRPO with summed and with gated rewards, tag hit rate and diversity, 3 seeds (~45 min)
	$(BIN)/python benchmarks/recgpt.py

bench-affinity: $(STAMP)  ## RollArc's affinity routing over two differing pools against one shared queue, 5 repeats (~20 min)
	$(BIN)/python benchmarks/affinity.py

bench-reward: $(STAMP)  ## a slow long-tailed reward on 1, 2, 4 and 8 replicas: step time, call latency, utilisation (~12 min)
	$(BIN)/python benchmarks/reward_scaling.py

bench-faults: $(STAMP)  ## each of five kinds of process SIGKILLed 3 times mid-run: lost, trained twice, accuracy (~55 min)
	$(BIN)/python benchmarks/faults.py

bench-prefix: $(STAMP)  ## a group's shared tokens once against per sample: trainer steps, engine tokens/s, multi-turn sessions (~2 min)
	$(BIN)/python benchmarks/prefix_sharing.py

bench-cpu: $(STAMP)  ## the default job's CPU per step by process, weights through NATS against the run folder (~6 min)
	$(BIN)/python benchmarks/cpu_budget.py

bench-soak: $(STAMP)  ## the default job for 2,000 steps: resident memory of every process and NATS's backlog (~30 min)
	$(BIN)/python benchmarks/soak.py

bench-simulate: $(STAMP)  ## the cluster simulator at paper scale (3,000 GPUs), its calibration and the papers' claims (~3 min)
	$(BIN)/rollfleet simulate examples/clusters/cluster-3000.yaml --out simulate-out

# TRL is a benchmark-only extra, installed into the same venv on first use.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) pyproject.toml constraints.txt
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -c constraints.txt -e '.[bench]'
	touch $(BENCH_STAMP)

bench-trl: $(BENCH_STAMP)  ## rollfleet (α = 1 and α = 0) against TRL's GRPOTrainer on the same job, 3 seeds per side (~40 min; benchmarks/RESULTS.md)
	$(BIN)/python benchmarks/trl_compare.py

crds: $(STAMP)  ## regenerate crds/ from src/rollfleet/spec.py
	$(BIN)/rollfleet crd | tee charts/rollfleet/crds/rljob.yaml > crds/rljob.yaml

# Container images, one per deployable: NAME:DOCKERFILE, each Dockerfile in its deployable's
# folder, the build context the repository root (.dockerignore keeps the context small).
# Needs a Docker engine, which the dev machine lacks: `make images` stops at `docker info`.
# tests/unit/test_dockerfiles.py reads this list and checks every Dockerfile on it.
#   make images REGISTRY=registry.example.com/rl TAG=dev
#   make images BUILD_ARGS="--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
DOCKER     ?= docker
REGISTRY   ?= ghcr.io/rollfleet
TAG        ?= 0.1.0
BUILD_ARGS ?=
IMAGES     := operator:operator/Dockerfile \
              rollout:services/rollout/Dockerfile \
              rollout-vllm:services/rollout/Dockerfile.vllm \
              trainer:services/trainer/Dockerfile \
              reward:services/reward/Dockerfile \
              env:services/env/Dockerfile
images:  ## build every image (needs a Docker engine)
	@$(DOCKER) info >/dev/null || { echo "make images: no Docker engine reachable ($(DOCKER) info failed above)" >&2; exit 1; }
	@for entry in $(IMAGES); do \
	  name=$${entry%%:*}; file=$${entry#*:}; \
	  echo "==> $(REGISTRY)/$$name:$(TAG) ($$file)"; \
	  $(DOCKER) build $(BUILD_ARGS) -f $$file -t $(REGISTRY)/$$name:$(TAG) . || exit 1; \
	done

dashboards-check: $(STAMP)  ## every dashboard panel's query returns data from a real Prometheus
	$(BIN)/python scripts/dashboards_check.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
