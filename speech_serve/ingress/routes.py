"""The Ingress deployment: the FastAPI app under @serve.ingress, its routes, and the wiring of the
objects they delegate to (each route is thin; the module that owns its concern does the work).

Routes
  GET  /healthz                   models real or test, replicas per deployment
  WS   /v1/stream                 plain JSON protocol (plain.py)
  WS   /xiaozhi/v1/               Xiaozhi devices: Opus, hello/listen/abort, stt (xiaozhi.py)
  WS   /  and  /funasr            FunASR runtime protocol, subprotocol "binary" (funasr.py)
  WS   /v1/realtime               OpenAI Realtime API, transcription sessions (realtime.py)
  POST /v1/audio/transcriptions   whole files, shaped like OpenAI's endpoint (files.py)
  /v1/speakers ...                voiceprint enrolment: create, list, get, rename, re-enrol, delete (speakers.py)
  /v1/hotwords/{group}            a household's hotword list: get, replace, delete (hotwords.py)
  GET  /demo, /demo/<file>        a page to talk to the service from a browser (demo_page.py)

Who may call what (auth.py): every device path (the WebSockets and the file endpoint)
takes device tokens when device authentication is on; /v1/speakers* and /v1/hotwords* always take the admin
bearer token; /healthz and the demo page's static files are open. Refusals come before any session, body or model work.
"""

import logging
import uuid

from fastapi import Depends, FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from ray import serve

from speech_serve.ingress.auth import AdminAuth, DeviceAuth, serve_bind_host
from speech_serve.ingress.capacity import ComputeAdmission
from speech_serve.ingress.demo_page import demo_asset
from speech_serve.ingress.files import FileTranscriptions
from speech_serve.ingress.health import DeploymentStates, public_source, readiness, serve_deployment_states
from speech_serve.ingress.hotwords import HotwordsAdmin, HouseholdHotwords
from speech_serve.ingress.metrics import IngressMetrics
from speech_serve.ingress.protocols.funasr import FunasrConnection
from speech_serve.ingress.protocols.plain import PlainConnection
from speech_serve.ingress.protocols.realtime import RealtimeConnection
from speech_serve.ingress.protocols.xiaozhi import XiaozhiConnection
from speech_serve.ingress.redaction import install_redaction
from speech_serve.ingress.sessions import Sessions
from speech_serve.ingress.speakers import SpeakerAdmin, admin_only
from speech_serve.ingress.stream import Backlog, ModelCalls, UtteranceStreams, live_stream_tasks
from speech_serve.ingress.uploads import upload_gates
from speech_serve.messages import ModelsSummary
from speech_serve.settings import AppSettings
from speech_serve.voiceprints import StoreUnavailable, open_store

logger = logging.getLogger("ray.serve")
# No /docs, /redoc or /openapi.json: unauthenticated pages listing every admin route (see docs/protocols.md)
app = FastAPI(title="speech-serve", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(StoreUnavailable)
async def store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
    """The voiceprint store cannot be reached (a corrupt or unreadable file, a database that is down): the
    admin API says so (503); the rest of the service goes on."""
    logger.error("%s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": str(exc)}, status_code=503)


def admin(method: str, path: str, **kwargs):
    """An admin API route: `admin_only` checks the admin token before anything else."""
    return app.api_route(path, methods=[method], dependencies=[Depends(admin_only)], **kwargs)


def new_session_id() -> str:
    return uuid.uuid4().hex[:16]


@serve.deployment  # its options: settings.DEPLOYMENT_OPTIONS, applied by the builder
@serve.ingress(app)
class Ingress:
    def __init__(self, vad, asr, speaker, registry, settings: AppSettings, models: ModelsSummary,
                 sizing: dict | None = None):  # fmt: skip
        self.models = models
        self.sizing = sizing or {}  # the builder's host plan (speech_serve/sizing.py), for /healthz
        self.limits = settings.limits
        self.xiaozhi_settings, self.funasr_settings = settings.xiaozhi, settings.funasr
        self.realtime_settings, self.vad_settings = settings.realtime, settings.vad
        self.metrics = IngressMetrics()
        security = settings.security
        # A secret set but too short raises InsecureSecret here: the replica does not start, and
        # Serve shows the message (which names the variable, never the value).
        self.device_auth = DeviceAuth.from_settings(security, serve_bind_host(security.bind_host_timeout_s))
        self.admin_auth = AdminAuth.from_settings(security)
        install_redaction(secrets=(self.device_auth.secret, self.admin_auth.token))  # before anything is logged
        self._log_security()
        backlog = Backlog(settings.admission, on_shed=self.metrics.shed)
        self.compute = ComputeAdmission(settings.admission, backlog, settings.compute,
                                        settings.vad.max_end_silence_ms / 1000)  # fmt: skip
        calls = ModelCalls(vad, asr, speaker, settings, backlog)
        store = open_store(settings.voiceprints.store)
        household = HouseholdHotwords(store, settings.voiceprints)
        self.hotwords = HotwordsAdmin(store, household, settings.limits)
        self.streams = UtteranceStreams(calls, settings, self.metrics, models.label, household)
        self.sessions = Sessions(registry, settings, self.device_auth, self.metrics, self.compute, asr)
        files, enrolments = upload_gates(settings.uploads)
        self.files = FileTranscriptions(calls, self.streams.recognise, self.device_auth, settings, files,
                                        household=household)  # fmt: skip
        self.speakers = SpeakerAdmin(store, calls, settings.voiceprints,
                                     settings.uploads, enrolments)  # fmt: skip
        self.health = DeploymentStates(serve_deployment_states, settings.health.cache_s, settings.health.timeout_s)
        for role, source in models.sources.items():
            logger.info("model %s: %s", role, source)
        if models.warning:
            logger.warning(models.warning)

    def _log_security(self) -> None:
        auth = self.device_auth
        logger.info("device authentication %s: %s", "ON" if auth.enabled else "off", auth.why)
        if auth.problem:  # start anyway (health checks, the admin API) but say it loudly
            banner = "!" * 100
            logger.warning("\n%s\n%s\n%s", banner, auth.problem, banner)
        if not self.admin_auth.token:
            logger.warning(
                "the admin API (/v1/speakers*) answers 503 until %s is set in the environment",
                self.admin_auth.env_name,
            )

    @app.get("/healthz")
    async def healthz(self, request: Request) -> JSONResponse:
        """200 while Ingress, VADHost and SenseVoice have a running replica ("ok", or "degraded" with the
        optional deployments that have none: the Speaker, the session registry); 503 otherwise. Open to
        probes: no paths, no variable names, nothing walked per call; the admin token adds the details
        (model paths, this replica's load, admission, the host plan, its stream tasks)."""
        status, down = "starting", []
        self.sessions.watch_compute()  # the compute cap, known before the first device comes
        body = {
            "status": "starting",
            "models": self.models.label,
            "model_sources": {role: public_source(source) for role, source in self.models.sources.items()},
            "live_sessions_this_replica": len(self.sessions.live),
            "device_auth": {"enabled": self.device_auth.enabled, "why": self.device_auth.why},
            "admin_api": "enabled" if self.admin_auth.token else "disabled (the Ingress log says why)",
        }
        if self.models.warning:
            body["warning"] = self.models.warning
        if self.device_auth.problem:
            body["device_auth"]["problem"] = "devices are refused: the Ingress log says why"
        if self.admin_auth.check(request.headers.get("authorization")).ok:
            body |= self._health_details()
        try:  # off the event loop (health.py): every session of this replica shares it
            body["deployments"] = await self.health.get()
            status, down = readiness(body["deployments"])
        except Exception as exc:  # the controller may be busy: report it, do not fail the probe's caller
            body["deployments"] = f"unavailable: {type(exc).__name__}"
        body["status"] = status
        if down:
            body["no_running_replica"] = down
        return JSONResponse(body, status_code=503 if status == "starting" else 200)

    def _health_details(self) -> dict:
        return {
            "model_sources": dict(self.models.sources),
            "stream_tasks_this_replica": live_stream_tasks(),  # 0 when idle: a leak check for soak tests
            # admission by compute, this replica: how long the oldest final has waited, what is shed now
            "load_this_replica": {"queue_delay_s": round(self.compute.backlog.queue_delay_s(), 3),
                                  "shedding": self.compute.backlog.shedding()},  # fmt: skip
            "compute_admission": self.compute.report(),
            "sizing": self.sizing,
            "device_auth": {"enabled": self.device_auth.enabled, "why": self.device_auth.why,
                            **({"problem": self.device_auth.problem} if self.device_auth.problem else {})},
            "admin_api": "enabled",
        }  # fmt: skip

    # ---- WebSockets: one connection class per protocol ----------------------------------------
    def _connection(self, cls, ws: WebSocket, *extra):
        return cls(ws, new_session_id(), self.streams, self.limits, self.metrics, *extra)

    @app.websocket("/v1/stream")
    async def stream(self, ws: WebSocket) -> None:
        await ws.accept()
        await self.sessions.serve(self._connection(PlainConnection, ws))

    @app.websocket("/xiaozhi/v1/")
    @app.websocket("/xiaozhi/v1")
    async def xiaozhi(self, ws: WebSocket) -> None:
        await ws.accept()
        await self.sessions.serve(self._connection(XiaozhiConnection, ws, self.xiaozhi_settings))

    @app.websocket("/")
    @app.websocket("/funasr")
    async def funasr(self, ws: WebSocket) -> None:
        # FunASR's client asks for the subprotocol "binary" and drops a connection without it.
        await ws.accept(subprotocol="binary" if "binary" in ws.scope.get("subprotocols", ()) else None)
        await self.sessions.serve(self._connection(FunasrConnection, ws, self.funasr_settings))

    @app.websocket("/v1/realtime")
    async def realtime(self, ws: WebSocket) -> None:
        """OpenAI's Realtime clients: `?intent=transcription` (and `model`) in the query and an
        `OpenAI-Beta` header may come; all are accepted, the session is a transcription one.
        Browsers offer the subprotocol "realtime"; it is taken when offered."""
        await ws.accept(subprotocol="realtime" if "realtime" in ws.scope.get("subprotocols", ()) else None)
        conn = self._connection(RealtimeConnection, ws, self.realtime_settings, self.vad_settings.max_end_silence_ms)
        await self.sessions.serve(conn)

    # ---- HTTP ---------------------------------------------------------------------------------
    @app.post("/v1/audio/transcriptions")
    async def transcriptions(self, request: Request) -> Response:
        """Form fields as OpenAI's: `file` (required), `model`, `language`, `response_format`."""
        return await self.files(request)

    @app.get("/demo")
    async def demo(self) -> Response:
        return demo_asset()

    @app.get("/demo/{name}")
    async def demo_file(self, name: str) -> Response:
        return demo_asset(name)

    @admin("POST", "/v1/speakers", status_code=201)
    async def enroll(self, request: Request) -> dict:
        """Enrol a speaker from recordings of their voice (WAV, FLAC, OGG, MP3): multipart
        form with `name`, one or more `files`, and optionally `group`."""
        return await self.speakers.enroll(request)

    @admin("POST", "/v1/speakers/from-session", status_code=201)
    async def enroll_from_session(self, request: Request) -> dict:
        """Enrol from the latest utterances of a live session on this ingress replica
        (JSON: name, session_id, last_n, group)."""
        return await self.speakers.enroll_from_session(request, self.sessions.live)

    @admin("GET", "/v1/speakers")
    async def list_speakers(self, group: str | None = None) -> dict:
        return await self.speakers.list(group)

    @admin("GET", "/v1/speakers/{speaker_id}")
    async def get_speaker(self, speaker_id: str) -> dict:
        return await self.speakers.get(speaker_id)

    @admin("PATCH", "/v1/speakers/{speaker_id}")
    async def rename_speaker(self, request: Request, speaker_id: str) -> dict:
        return await self.speakers.rename(request, speaker_id)

    @admin("PUT", "/v1/speakers/{speaker_id}/embeddings")
    async def reenroll(self, request: Request, speaker_id: str) -> dict:
        """Replace a speaker's voiceprint with new recordings (multipart `files`)."""
        return await self.speakers.reenroll(request, speaker_id)

    @admin("GET", "/v1/hotwords/{group}")
    async def get_hotwords(self, group: str) -> dict:
        return await self.hotwords.get(group)

    @admin("PUT", "/v1/hotwords/{group}")
    async def put_hotwords(self, request: Request, group: str) -> dict:
        return await self.hotwords.put(request, group)

    @admin("DELETE", "/v1/hotwords/{group}", status_code=204)
    async def delete_hotwords(self, group: str) -> Response:
        return await self.hotwords.delete(group)

    @admin("DELETE", "/v1/speakers/{speaker_id}", status_code=204)
    async def delete_speaker(self, speaker_id: str) -> Response:
        return await self.speakers.delete(speaker_id)
