# ws_exporter developer targets (recipes are indented with tabs).
PYTHON ?= python3
PEERS_ENV := .cache/peers/env.sh

.PHONY: run test lint docker bench peers soak

run:
	$(PYTHON) ws_exporter.py

test:
	bash .ci/test

# py_compile under the oldest supported Python (3.8) when present, then
# mypy --strict from the peer cache (only mypy is installed for it). Fails on errors.
lint:
	@bash .ci/peers mypy
	@py38=$$(ls -d $$HOME/.pyenv/versions/3.8.*/bin/python 2>/dev/null | sort -V | tail -n 1); \
	if [ -n "$$py38" ]; then \
		echo "py_compile with $$py38"; \
		"$$py38" -m py_compile ws_exporter.py || exit 1; \
	else \
		echo "no Python 3.8 found; py_compile with $(PYTHON)"; \
		$(PYTHON) -m py_compile ws_exporter.py || exit 1; \
	fi; \
	. ./$(PEERS_ENV); \
	if [ -z "$$WS_MYPY_PATH" ]; then echo "mypy is not available (see .ci/peers output)"; exit 1; fi; \
	PYTHONPATH="$$WS_MYPY_PATH" python3 -m mypy --strict ws_exporter.py

docker:
	docker build -t ws-exporter .

bench:
	bash .ci/peers && . ./$(PEERS_ENV) && $(PYTHON) bench/run.py

soak:
	bash .ci/peers && . ./$(PEERS_ENV) && $(PYTHON) bench/soak.py --report-dir docs/soak

peers:
	bash .ci/peers
