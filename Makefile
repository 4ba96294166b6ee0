PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench install clean deps proto

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/kplane up --data-dir .kplane

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

# Debian packages the root-only tests use (iproute2, nftables, openssh-server, etcd-server)
deps:
	scripts/debian-deps.sh

test: $(STAMP) deps lint
	$(BIN)/python -m pytest -q

# Regenerate the committed Konnectivity protobuf/gRPC modules from src/kplane/tunnel/konnectivity.proto
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I src --python_out=src --pyi_out=src --grpc_python_out=src \
		src/kplane/tunnel/konnectivity.proto

# Every benchmark in bench/, one after the other; writes bench/RESULTS.md (bench/report.py --no-write: print only)
bench: $(STAMP)
	$(BIN)/python bench/report.py

clean:
	rm -rf $(VENV) .kplane build *.egg-info src/*.egg-info
