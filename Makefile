# The two entry points a new machine needs. Both set up .venv first (idempotent).
#   make serve            set up, then serve the default model on 127.0.0.1:8080
#   make test             set up, then run the test suite
#   make lint             set up, then mypy and ruff on supervisor/, worker/, bench/ (CI runs it)
# ARGS are passed to `vram-llm serve`, e.g. make serve ARGS="--host 0.0.0.0 --model /m.gguf"
.PHONY: setup serve test lint bench
ARGS ?=
# make bench: BATCHING_ARGS go to the concurrency section (bench/batching.py; llama-server
# -np 4 column when LLAMA_SERVER names the binary).
BATCHING_ARGS ?=
# bench.scheduler: the scheduler and drafts against llama-server (LLAMA_SERVER) in one paired run.
SCHEDULER_ARGS ?=

setup:
	scripts/bootstrap.sh

serve: setup
	.venv/bin/vram-llm serve $(ARGS)

test: setup
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/mypy supervisor worker bench
	.venv/bin/ruff check supervisor worker bench

bench: setup
	.venv/bin/python -m bench $(ARGS)
	.venv/bin/python -m bench.batching $(BATCHING_ARGS)
	.venv/bin/python -m bench.scheduler $(SCHEDULER_ARGS)
