"""The pod admission webhook server (DESIGN section 8): ``python -m capacity_operator.webhook``.

An HTTPS server (aiohttp) answering ``admission.k8s.io/v1`` AdmissionReviews for pods labelled
``capacity.platform.dev/claim``: ``POST /mutate`` adds the claim's placement nodes to the pod's
required node affinity, ``POST /validate`` refuses pods whose claim is missing or not
``Admitted``; ``GET /healthz`` and ``GET /readyz`` are for probes. The decisions are pure
(:mod:`capacity_api.webhook`); this module reads the claim (one GET per review, in a worker
thread) and keeps the serving certificate: files given with ``--tls-cert``/``--tls-key`` or
``--cert-dir`` (cert-manager; reloaded when they change), or ``--self-signed``, where a CA and a
serving certificate live in a Secret that every replica shares and the CA is patched into the
webhook configurations' ``caBundle``. It runs as its own process and Deployment, so an operator
restart never stalls pod creation. ``docs/webhook.md`` describes it for users.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import ssl
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from aiohttp import web
from kubernetes import client
from kubernetes.client.rest import ApiException

from capacity_api import GROUP, VERSION, __version__
from capacity_api.cluster_access import EXIT_NO_CLUSTER, ClusterSource
from capacity_api.webhook import (
    Decision,
    Hook,
    MalformedReviewError,
    ReviewRequest,
    claim_to_read,
    decide,
    parse_review_body,
    review_response,
)
from capacity_operator import cluster
from capacity_operator.webhook_tls import CERT_KEY, KEY_KEY, TlsMaterial, ensure, parse_ip

PROG = "capacity-webhook"
DEFAULT_PORT = 9443
DEFAULT_SECRET = "capacity-webhook-tls"  # noqa: S105 - the name of a Secret, not a secret
SYSTEM_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease")
MAX_BODY = 8 * 1024 * 1024
"""Largest AdmissionReview accepted (the API server's own request limit is 3 MiB)."""
EXIT_STARTUP = 1

log = logging.getLogger("capacity_operator.webhook")
JSON = dict[str, Any]
_DNS_NAME = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class StartupError(Exception):
    """The server cannot start: one line for stderr."""


# -- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """Every knob of the webhook server (its command-line flags)."""

    kubeconfig: str | None = None
    bind: str = "0.0.0.0"  # noqa: S104 - a webhook in a pod listens on the pod's address
    port: int = DEFAULT_PORT
    tls_cert: str | None = None
    tls_key: str | None = None
    cert_dir: str | None = None
    self_signed: bool = False
    dns_names: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    secret_namespace: str | None = None
    secret_name: str = DEFAULT_SECRET
    webhook_config_name: str | None = None
    skip_namespaces: tuple[str, ...] = SYSTEM_NAMESPACES
    resync_seconds: float = 60.0
    claim_timeout_seconds: float = 2.0
    verbose: bool = False

    def cert_files(self) -> tuple[Path, Path] | None:
        """The certificate and key files to serve with (None in self-signed mode)."""
        if self.self_signed:
            return None
        if self.tls_cert and self.tls_key:
            return Path(self.tls_cert), Path(self.tls_key)
        directory = Path(self.cert_dir or ".")
        return directory / CERT_KEY, directory / KEY_KEY


class _Parser(argparse.ArgumentParser):
    """argparse with errors on one line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number of seconds")
    return number


def _ip(value: str) -> str:
    try:
        return str(parse_ip(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dns_name(value: str) -> str:
    name = value.strip().lower().rstrip(".")
    if not name or len(name) > 253 or not _DNS_NAME.match(name):
        raise argparse.ArgumentTypeError(f"{value!r} is not a DNS name")
    return name


def parse_args(argv: list[str] | None) -> WebhookSettings:
    parser = _Parser(
        prog=PROG,
        description="Pod admission webhook of the Capacity Platform: pods labelled "
        "capacity.platform.dev/claim are bound to their claim's placement nodes, and refused "
        "unless the claim is Admitted.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--kubeconfig",
        help="kubeconfig file (default: $KUBECONFIG, else in-cluster, else ~/.kube/config)",
    )
    parser.add_argument("--bind", default="0.0.0.0", help="address to listen on (0.0.0.0)")  # noqa: S104
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT, help="HTTPS port (9443)")
    tls = parser.add_argument_group(
        "certificates (one of: --tls-cert/--tls-key, --cert-dir, --self-signed)"
    )
    tls.add_argument("--tls-cert", help="serving certificate (PEM), e.g. cert-manager's tls.crt")
    tls.add_argument("--tls-key", help="its private key (PEM)")
    tls.add_argument(
        "--cert-dir",
        help="directory with tls.crt and tls.key (a mounted Secret); with --self-signed: where "
        "the generated ones are written (default: a private temporary directory)",
    )
    tls.add_argument(
        "--self-signed",
        action="store_true",
        help="generate a CA and serving certificate, keep them in a Secret shared by every "
        "replica, and patch the CA into the webhook configurations' caBundle",
    )
    tls.add_argument(
        "--dns-name",
        action="append",
        type=_dns_name,
        default=[],
        dest="dns_names",
        help="name the certificate is for, e.g. capacity-webhook.capacity-system.svc (repeatable)",
    )
    tls.add_argument(
        "--ip",
        action="append",
        type=_ip,
        default=[],
        dest="ips",
        help="IP address the certificate is for (repeatable)",
    )
    tls.add_argument("--secret-namespace", help="namespace of the Secret (default: the pod's)")
    tls.add_argument(
        "--secret-name", default=DEFAULT_SECRET, help=f"name of the Secret ({DEFAULT_SECRET})"
    )
    tls.add_argument(
        "--webhook-config-name",
        help="Mutating- and ValidatingWebhookConfiguration whose caBundle is kept (self-signed)",
    )
    parser.add_argument(
        "--skip-namespace",
        action="append",
        dest="skip_namespaces",
        help="never judge pods of this namespace (repeatable; default: kube-system, "
        "kube-public, kube-node-lease); the configuration's namespaceSelector should say the same",
    )
    parser.add_argument(
        "--resync-seconds",
        type=_positive,
        default=60.0,
        help="how often the Secret, caBundle and certificate files are checked (60)",
    )
    parser.add_argument(
        "--claim-timeout",
        type=_positive,
        default=2.0,
        dest="claim_timeout_seconds",
        help="seconds to wait for the API server when reading a claim (2)",
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    _check_modes(parser, args)
    return WebhookSettings(
        kubeconfig=args.kubeconfig,
        bind=args.bind,
        port=args.port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        cert_dir=args.cert_dir,
        self_signed=args.self_signed,
        dns_names=tuple(dict.fromkeys(args.dns_names)),
        ips=tuple(dict.fromkeys(args.ips)),
        secret_namespace=args.secret_namespace,
        secret_name=args.secret_name,
        webhook_config_name=args.webhook_config_name,
        skip_namespaces=tuple(args.skip_namespaces or SYSTEM_NAMESPACES),
        resync_seconds=args.resync_seconds,
        claim_timeout_seconds=args.claim_timeout_seconds,
        verbose=args.verbose,
    )


def _check_modes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.self_signed:
        if args.tls_cert:
            parser.error("--self-signed makes its own certificate: drop --tls-cert/--tls-key")
        if not args.dns_names and not args.ips:
            parser.error(
                "--self-signed needs the names the API server calls the webhook by: "
                "--dns-name (e.g. <service>.<namespace>.svc) and/or --ip"
            )
        return
    if not args.tls_cert and not args.cert_dir:
        parser.error(
            "no certificate: give --tls-cert and --tls-key, --cert-dir, or --self-signed "
            "(the API server calls webhooks over HTTPS only)"
        )
    if args.dns_names or args.ips or args.webhook_config_name:
        parser.error(
            "--dns-name, --ip and --webhook-config-name only apply with --self-signed "
            "(with cert-manager, its CA injector sets caBundle)"
        )


# -- claims -------------------------------------------------------------------------------------


class ClaimReader:
    """Reads a claim per review: a GET in a worker thread, so the event loop never waits."""

    def __init__(self, api: client.ApiClient, timeout: float) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.timeout = timeout

    async def get(self, namespace: str, name: str) -> JSON | None:
        try:
            out: JSON = await asyncio.to_thread(
                self.custom.get_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                "capacityclaims",
                name,
                _request_timeout=self.timeout,
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return out


# -- certificates -------------------------------------------------------------------------------


class ServingCert:
    """The TLS context the server listens with, loaded again when its files change."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp: tuple[tuple[int, int, int], ...] | None = None

    @property
    def loaded(self) -> bool:
        return self._stamp is not None

    def reload(self) -> bool:
        """Load the files when they changed since the last load; True when it loaded them.
        Connections opened afterwards get the new certificate."""
        stamp = tuple(_stamp(p) for p in (self.cert, self.key))
        if stamp == self._stamp:
            return False
        self.context.load_cert_chain(self.cert, self.key)
        self._stamp = stamp
        return True


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()  # follows the ..data symlink of a mounted Secret
    return st.st_ino, st.st_mtime_ns, st.st_size


@dataclass
class Readiness:
    """What keeps the server from being ready, by topic (empty: ready)."""

    problems: dict[str, str] = field(default_factory=dict)

    def set(self, topic: str, problem: str | None) -> None:
        if problem is None:
            self.problems.pop(topic, None)
        else:
            self.problems[topic] = problem


class SelfSigned:
    """``--self-signed``: the CA and serving certificate in a Secret shared by every replica,
    written to the certificate directory, and the CA in the webhook configurations' caBundle."""

    def __init__(
        self,
        api: client.ApiClient,
        settings: WebhookSettings,
        namespace: str,
        serving: ServingCert,
        readiness: Readiness,
    ) -> None:
        self.core = client.CoreV1Api(api)
        self.admission = client.AdmissionregistrationV1Api(api)
        self.settings = settings
        self.namespace = namespace
        self.serving = serving
        self.readiness = readiness
        self.material: TlsMaterial | None = None

    @property
    def secret(self) -> str:
        return f"{self.namespace}/{self.settings.secret_name}"

    async def sync(self) -> None:
        """One pass: Secret, files, caBundle (each step level-based, writes only on change)."""
        material = await asyncio.to_thread(self._sync_secret)
        if material != self.material:
            self._write_files(material)
            self.material = material
        if self.serving.reload():
            log.info("serving the certificate of Secret %s", self.secret)
        self.readiness.set("tls", None)
        if self.settings.webhook_config_name:
            # not fatal: the configurations may come later (or RBAC be fixed); /readyz says why
            try:
                problem = await asyncio.to_thread(self._sync_ca_bundles, material.ca_bundle)
            except ApiException as exc:
                problem = f"{exc.status} {exc.reason}: {_api_message(exc)}"
            except Exception as exc:  # any failure is retried on the next pass
                problem = _failure(exc)
            self.readiness.set("caBundle", problem)
            if problem:
                log.warning("caBundle not in place: %s", problem)

    def _sync_secret(self) -> TlsMaterial:
        name = self.settings.secret_name
        for _ in range(5):
            live = self._read_secret()
            existing = TlsMaterial.from_secret_data((live or {}).get("data"))
            material, why = ensure(
                existing, self.settings.dns_names, self.settings.ips, datetime.now(UTC)
            )
            if why is None:
                if self.material is None:
                    log.info("reusing the certificate in Secret %s", self.secret)
                return material
            try:
                if live is None:
                    body = {
                        "apiVersion": "v1",
                        "kind": "Secret",
                        "metadata": {
                            "name": name,
                            "labels": {"app.kubernetes.io/managed-by": PROG},
                        },
                        "type": "kubernetes.io/tls",
                        "data": material.secret_data(),
                    }
                    self.core.create_namespaced_secret(self.namespace, body)
                else:
                    # strategic merge patch guarded by resourceVersion: two replicas renewing
                    # at once cannot both win; the loser re-reads and serves the winner's
                    rv = live["metadata"]["resourceVersion"]
                    patch = {"metadata": {"resourceVersion": rv}, "data": material.secret_data()}
                    self.core.patch_namespaced_secret(name, self.namespace, patch)
            except ApiException as exc:
                if exc.status == 409:
                    continue  # another replica wrote first: judge what it wrote
                raise
            log.info("wrote Secret %s: %s", self.secret, why)
            return material
        raise StartupError(f"Secret {self.secret} keeps changing under us; giving up this pass")

    def _read_secret(self) -> JSON | None:
        try:
            resp = self.core.read_namespaced_secret(
                self.settings.secret_name, self.namespace, _preload_content=False
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        out: JSON = json.loads(resp.data)
        return out

    def _write_files(self, material: TlsMaterial) -> None:
        directory = self.serving.cert.parent
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path, data in ((self.serving.key, material.key), (self.serving.cert, material.cert)):
            tmp = path.with_name(f".{path.name}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            tmp.replace(path)
        (directory / "ca.crt").write_bytes(material.ca_cert)

    def _sync_ca_bundles(self, bundle: str) -> str | None:
        """Put ``bundle`` into every webhook of both named configurations; why not, or None."""
        name = self.settings.webhook_config_name or ""
        kinds: list[tuple[str, Callable[..., Any], Callable[..., Any]]] = [
            (
                "MutatingWebhookConfiguration",
                self.admission.read_mutating_webhook_configuration,
                self.admission.patch_mutating_webhook_configuration,
            ),
            (
                "ValidatingWebhookConfiguration",
                self.admission.read_validating_webhook_configuration,
                self.admission.patch_validating_webhook_configuration,
            ),
        ]
        missing: list[str] = []
        for kind, read, patch in kinds:
            try:
                live = json.loads(read(name, _preload_content=False).data)
            except ApiException as exc:
                if exc.status == 404:
                    missing.append(f"{kind} {name} not found")
                    continue
                raise
            ops: list[JSON] = []
            for index, hook in enumerate(live.get("webhooks") or []):
                if (hook.get("clientConfig") or {}).get("caBundle") == bundle:
                    continue
                # the test pins the index to the webhook we looked at
                ops.append({"op": "test", "path": f"/webhooks/{index}/name", "value": hook["name"]})
                ops.append(
                    {
                        "op": "add",
                        "path": f"/webhooks/{index}/clientConfig/caBundle",
                        "value": bundle,
                    }
                )
            if ops:
                patch(name, ops)
                log.info("patched caBundle of %s %s (%d webhooks)", kind, name, len(ops) // 2)
        return "; ".join(missing) or None


# -- the server ---------------------------------------------------------------------------------


@dataclass
class Webhook:
    """The request handlers."""

    claims: ClaimReader
    readiness: Readiness
    skip_namespaces: frozenset[str]

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/mutate", self._review(Hook.MUTATE))
        app.router.add_post("/validate", self._review(Hook.VALIDATE))
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        return app

    async def healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, _: web.Request) -> web.Response:
        problems = self.readiness.problems
        if problems:
            text = "".join(f"{topic}: {why}\n" for topic, why in sorted(problems.items()))
            return web.Response(status=503, text=text)
        return web.Response(text="ok\n")

    def _review(self, hook: Hook) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            return await self.review(hook, request)

        return handle

    async def review(self, hook: Hook, request: web.Request) -> web.Response:
        try:
            review = parse_review_body(await request.read())
        except MalformedReviewError as exc:
            message = f"malformed AdmissionReview: {exc}"
            log.warning("%s from %s: %s", hook, request.remote, message)
            return web.Response(status=400, text=message + "\n")
        try:
            decision = await self.decide(hook, review)
        except Exception as exc:  # the API server applies the failure policy to a 500
            message = f"cannot judge {review.pod}: {_failure(exc)}"
            log.error("%s %s: %s", hook, review.pod, message)
            return web.Response(status=500, text=message + "\n")
        _log_decision(hook, review, decision)
        return web.json_response(review_response(review.uid, decision))

    async def decide(self, hook: Hook, review: ReviewRequest) -> Decision:
        if review.namespace in self.skip_namespaces:
            return Decision(True, f"namespace {review.namespace} is never judged")
        name = claim_to_read(review)
        claim = await self.claims.get(review.namespace, name) if name else None
        return decide(hook, review, claim)


def _log_decision(hook: Hook, review: ReviewRequest, decision: Decision) -> None:
    verdict = "allowed" if decision.allowed else "refused"
    count = len(decision.patch)
    ops = f" (JSON Patch: {count} op{'s' * (count != 1)})" if count else ""
    dry = " (dry run)" if review.dry_run else ""
    log.info(
        "%s %s claim=%s %s%s: %s%s",
        hook,
        review.pod,
        decision.claim or "-",
        verdict,
        dry,
        decision.message,
        ops,
    )


def _failure(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"reading the claim failed: {exc.status} {exc.reason}"
    return " ".join(str(exc).split()) or type(exc).__name__


async def serve(settings: WebhookSettings, access: cluster.ClusterAccess) -> int:
    api = cluster.api_client(access)
    readiness = Readiness({"tls": "no serving certificate loaded yet"})
    keeper: SelfSigned | None = None
    # in a pod, its own namespace; a kubeconfig context's namespace says nothing about us
    pod_namespace = access.namespace if access.choice.source is ClusterSource.IN_CLUSTER else None
    secret_namespace = settings.secret_namespace or pod_namespace
    skip = set(settings.skip_namespaces)
    if pod_namespace:
        skip.add(pod_namespace)
    with contextlib.ExitStack() as stack:
        stack.callback(api.close)
        files = settings.cert_files()
        if files is None:
            if not secret_namespace:
                raise StartupError("--self-signed needs --secret-namespace outside a pod")
            skip.add(secret_namespace)
            directory = Path(settings.cert_dir) if settings.cert_dir else None
            if directory is None:
                directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=PROG)))
            serving = ServingCert(directory / CERT_KEY, directory / KEY_KEY)
            keeper = SelfSigned(api, settings, secret_namespace, serving, readiness)
            try:
                await keeper.sync()
            except ApiException as exc:
                raise StartupError(
                    f"Secret {keeper.secret}: {exc.status} {exc.reason}: {_api_message(exc)}"
                ) from exc
            except (OSError, ssl.SSLError, StartupError) as exc:
                raise StartupError(f"Secret {keeper.secret}: {_failure(exc)}") from exc
        else:
            serving = ServingCert(*files)
            try:
                serving.reload()
            except (OSError, ssl.SSLError) as exc:
                raise StartupError(f"cannot load {files[0]} / {files[1]}: {exc}") from exc
            readiness.set("tls", None)
        webhook = Webhook(
            ClaimReader(api, settings.claim_timeout_seconds), readiness, frozenset(skip)
        )
        runner = web.AppRunner(webhook.app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, settings.bind, settings.port, ssl_context=serving.context)
            try:
                await site.start()
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {settings.bind}:{settings.port}: {exc.strerror or exc}"
                ) from exc
            log.info(
                "serving https://%s:%d (/mutate, /validate, /healthz, /readyz)%s",
                settings.bind,
                settings.port,
                f"; self-signed, Secret {keeper.secret}" if keeper else f"; {serving.cert}",
            )
            await _run_until_stopped(settings, serving, keeper)
        finally:
            await runner.cleanup()
    log.info("stopped")
    return 0


async def _run_until_stopped(
    settings: WebhookSettings, serving: ServingCert, keeper: SelfSigned | None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.resync_seconds)
        if stop.is_set():
            break
        try:
            if keeper is not None:
                await keeper.sync()
            elif serving.reload():
                log.info("loaded the new certificate %s", serving.cert)
        except Exception as exc:  # keep serving with what we have; try again next pass
            log.warning("certificate resync failed: %s", _failure(exc))


def _api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except ValueError:
        return str(exc.reason)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if settings.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        access = cluster.load(settings.kubeconfig)
        cluster.check_reachable(access)
    except cluster.ClusterAccessError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_NO_CLUSTER
    try:
        return asyncio.run(serve(settings, access))
    except StartupError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_STARTUP


if __name__ == "__main__":
    sys.exit(main())
