# street2shop: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install demo test lint test-serial test-fast bench bench-retrieval image clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev,report,service,client,beam,milvus]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/street2shop demo --workdir demo-output

# Two workers, whole files per worker (module fixtures such as the exported model are built once),
# in the order tests/conftest.py gives them: the longest first.
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations 15

# Undefined names, unused imports, syntax errors.
lint: $(STAMP)
	$(BIN)/ruff check --select F,E9 street2shop tools tests

test-serial: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow'

# Benchmarks (see BENCHMARKS.md for the figures); bench-retrieval runs about 1 h 45 min here:
# the named recipe (configs/; BENCHMARKS "Round 5" for v3 and v2, "Round 4" for v1: RECIPE=configs/grocery-30min-v1.toml)
# over 3 seeds, the two baselines, then more views per photo.
bench: $(STAMP)
	$(BIN)/python tools/bench_pipeline.py --image-size 128
	$(BIN)/python tools/bench_train.py --image-size 96 --rounds 5 --steps 4
	$(BIN)/python tools/bench_serving.py --image-size 96 128 --rounds 9
	$(BIN)/python tools/bench_index.py --sizes 100000 1000000

RECIPE ?= configs/grocery-30min-v3.toml
bench-retrieval: $(STAMP)
	$(BIN)/python tools/bench_retrieval.py --config $(RECIPE) --variants histogram untrained robust_multitask_products \
	    --seeds 0 1 2 --out bench-output/$(basename $(notdir $(RECIPE)))
	$(BIN)/python tools/bench_views.py bench-output/$(basename $(notdir $(RECIPE))) --latency \
	    --out bench-output/$(basename $(notdir $(RECIPE)))/views.json

# The search service's image (deploy/Containerfile), with podman or docker, whichever is installed; needs no .venv.
# E.g. make image BASE_IMAGE=localhost/debian:bookworm-local IMAGE_FLAGS='--network host'. README "Deploying".
ENGINE     ?= $(shell command -v podman 2>/dev/null || command -v docker 2>/dev/null)
IMAGE      ?= street2shop-search:latest
BASE_IMAGE ?= python:3.11-slim
TENSORFLOW ?= tensorflow-cpu
IMAGE_FLAGS ?=
image:
	@test -n "$(ENGINE)" || { echo "make image: needs podman or docker" >&2; exit 2; }
	$(ENGINE) build $(if $(findstring podman,$(notdir $(ENGINE))),--format docker) -f deploy/Containerfile \
	    --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg TENSORFLOW=$(TENSORFLOW) $(IMAGE_FLAGS) -t $(IMAGE) .

clean:
	rm -rf $(VENV) build *.egg-info demo-output tour .pytest_cache
