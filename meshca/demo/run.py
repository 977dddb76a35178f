"""``meshca demo``: the whole mesh on this machine, on loopback, step by step.

What runs (every process a real ``meshca`` command, each in its own process group):

- a CA (``meshca server``: SQLite ledger; root key in SoftHSM2 when installed, otherwise
  in a file) that trusts a local stand-in for a Kubernetes cluster's token issuer;
- three agents (``meshca agent`` with the mTLS proxy in process): ``backend`` (inbound,
  in front of a small HTTP app, with a policy that lets only ``frontend`` in),
  ``frontend`` (outbound to the backend) and ``intruder``, a machine outside Kubernetes
  that joins with a join token and is refused by the backend's policy;
- traffic from frontend to backend while every certificate is renewed, and while the
  root is rotated (prepare, activate, retire); the demo fails if one request fails.

Everything lives in one temporary directory, kept at the end for a look; Ctrl-C (or
SIGTERM) at any point stops every process the demo started.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import aiohttp
import grpc
import yaml
from aiohttp import web
from cryptography import x509

from meshca.agent.rotation import new_key_and_csr
from meshca.api._proto import istioca_pb2, istioca_pb2_grpc
from meshca.demo.children import Child, Children, DemoError
from meshca.demo.issuer import TOKEN_LABEL, LocalIssuer, init_softhsm2_token, softhsm2_module
from meshca.demo.web import AccessLog, Traffic, describe, get, start_backend
from meshca.demo.workload import Workload, fingerprint
from meshca.pki.keys import KeyAlgorithm

TRUST_DOMAIN = "cluster.local"
NAMESPACE = "demo"
FRONTEND = f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/frontend"
BACKEND = f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/backend"
INTRUDER = f"spiffe://{TRUST_DOMAIN}/vm/intruder"
PROPAGATION_SECONDS = 2.0
READY_TIMEOUT = 60.0
STEP_TIMEOUT = 20.0
STEPS = 8

_CA_PORTS = {
    "grpc": re.compile(r"gRPC TLS on ([0-9.]+:\d+)"),
    "mtls": re.compile(r"gRPC mTLS \(SVID renewal\) on ([0-9.]+:\d+)"),
    "http": re.compile(r"HTTP on ([0-9.]+:\d+)"),
}
_PROXY_PORT = re.compile(r"(?:inbound|outbound) \S+ \(port (\d+)\)")


@dataclass
class Demo:
    """The steps, the processes and the files of one demo run."""

    out: TextIO = sys.stdout
    meshca: tuple[str, ...] = (sys.executable, "-m", "meshca")
    shown_as: str = "meshca"
    keep: bool = False
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="meshca-demo-")))
    children: Children = field(init=False)
    backend_app: web.AppRunner | None = None
    traffic: Traffic | None = None
    ca: Child | None = None
    ca_ports: dict[str, str] = field(default_factory=dict)
    hsm: str = ""
    workloads: dict[str, Workload] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    _step: int = 0

    def __post_init__(self) -> None:
        (self.directory / "logs").mkdir()
        (self.directory / "tmp").mkdir(mode=0o700)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHCA_", "SOFTHSM2_"))}
        # Every temporary file of every child (the CA's metrics directory too) stays here.
        env.update(TMPDIR=str(self.directory / "tmp"), PYTHONUNBUFFERED="1")
        self.children = Children(env, self.directory / "logs")
        self.config = self.directory / "meshca.yaml"

    # -- output -----------------------------------------------------------------------

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def step(self, title: str) -> None:
        self._step += 1
        elapsed = time.monotonic() - self.started
        self.say(f"\n[{self._step}/{STEPS}] {title}  ({elapsed:.1f}s)")

    def detail(self, text: str) -> None:
        for line in text.splitlines() or [""]:
            self.say(f"      {line}")

    def command(self, *args: str) -> None:
        self.detail("$ " + " ".join([self.shown_as, *(shlex.quote(a) for a in args)]))

    async def admin(
        self, *args: str, expect: int | None = 0, lines: int = 3, match: str | None = None
    ) -> str:
        """Run ``meshca admin ...`` as the user would; show it and the first ``lines``
        lines of its output (those that ``match`` a regular expression, if given)."""
        self.command("admin", *args)
        code, output = await self.children.run([*self.meshca, "admin", *args])
        shown = [
            line
            for line in output.splitlines()
            if line.strip() and (match is None or re.search(match, line))
        ][:lines]
        for line in shown:
            self.detail(f"  {line}")
        if expect is not None and code != expect:
            raise DemoError(f"`meshca admin {' '.join(args)}` exited {code}:\n{output}")
        return output

    # -- the steps --------------------------------------------------------------------

    async def run(self) -> None:
        self.say("meshca demo: a CA, two workloads and an intruder on this machine, on loopback")
        self.say(f"  files: {self.directory} (kept when the demo ends)")
        await self.start_ca()
        await self.start_backend_app()
        await self.start_agents()
        await self.requests()
        await self.intruder()
        self.traffic = Traffic(self.workloads["frontend"].proxy_port)
        self.traffic.start()
        await self.rotate_certificates()
        await self.rotate_root()
        await self.ledger()
        await self.summary()

    async def start_ca(self) -> None:
        module = softhsm2_module()
        signer: dict[str, object]
        if module is not None:
            self.step("Root key in SoftHSM2 (PKCS#11), in a token made for this demo")
            pin = secrets.token_hex(8)
            conf = await asyncio.to_thread(init_softhsm2_token, self.directory / "softhsm", pin)
            self.children.env.update(SOFTHSM2_CONF=str(conf), MESHCA_PKCS11_PIN=pin)
            signer = {"kind": "pkcs11", "module": str(module), "token_label": TOKEN_LABEL}
            self.hsm = "SoftHSM2"
            self.detail(f"PKCS#11 module {module}; token directory {conf.parent / 'tokens'}")
        else:
            self.step("Root key in a file (SoftHSM2 is not installed: apt install softhsm2)")
            signer = {"kind": "file"}
            self.hsm = "a file (development only)"
        self.issuer = LocalIssuer(self.directory / "issuer-jwks.json")
        config = {
            "trust_domain": TRUST_DOMAIN,
            "state_dir": str(self.directory / "ca"),
            "grpc_listen": "127.0.0.1:0",
            "grpc_mtls_listen": "127.0.0.1:0",
            "http_listen": "127.0.0.1:0",
            "workers": 1,
            "maintenance_interval": "1s",
            "root_propagation": f"{PROPAGATION_SECONDS:g}s",
            "signer": signer,
            "clusters": [
                {
                    "mode": "jwt",
                    "issuer": "https://kubernetes.default.svc.cluster.local",
                    "jwks_file": str(self.issuer.jwks_file),
                }
            ],
        }
        self.config.write_text(
            "# meshca demo: the CA's configuration (flags and MESHCA_* variables override it)\n"
            + yaml.safe_dump(config, sort_keys=False)
        )
        if module is not None:
            await self.admin("root", "create", "--config", str(self.config), match="^root ")

        self.step("CA: gRPC (Istio and MeshCA APIs) over TLS, SQLite ledger")
        self.detail(
            "trusting tokens of a local stand-in for a Kubernetes cluster's issuer "
            f"({self.issuer.jwks_file.name})"
        )
        self.command("server", "--config", str(self.config))
        self.ca = await self.children.start(
            "ca", [*self.meshca, "server", "--config", str(self.config)]
        )
        line = await self.ca.ready_line("meshca ready", READY_TIMEOUT)
        for name, pattern in _CA_PORTS.items():
            found = pattern.search(line)
            if found is None:
                raise DemoError(f"the CA's ready line names no {name} port: {line}")
            self.ca_ports[name] = found.group(1)
        took = time.monotonic() - self.ca.started
        self.detail(
            f"ready in {took:.1f}s: gRPC {self.ca_ports['grpc']}, SVID renewal (mTLS) "
            f"{self.ca_ports['mtls']}, trust bundle http://{self.ca_ports['http']}/v1/bundle"
        )

    async def start_backend_app(self) -> None:
        self.backend_app, self.app_port = await start_backend()

    def _agent_config(self, workload: Workload, pin: str, **settings: object) -> Path:
        return workload.write_config(self.ca_ports, pin, TRUST_DOMAIN, **settings)

    def _token(self, workload: Workload, service_account: str) -> str:
        path = workload.directory / "token"
        path.write_text(self.issuer.token(NAMESPACE, service_account) + "\n")
        path.chmod(0o600)
        return str(path)

    async def _root_pin(self) -> str:
        status, body = await get(int(self.ca_ports["http"].rpartition(":")[2]), "/v1/bundle")
        if status != 200:
            raise DemoError(f"the CA's bundle endpoint answered {status}")
        return fingerprint(x509.load_pem_x509_certificates(body.encode())[0])

    async def _start_agent(self, workload: Workload, config: Path) -> None:
        self.command("agent", "--config", str(config))
        workload.child = await self.children.start(
            workload.name, [*self.meshca, "agent", "--config", str(config)]
        )

    async def _agent_ready(self, workload: Workload) -> None:
        assert workload.child is not None
        line = await workload.child.ready_line("meshca agent ready", READY_TIMEOUT)
        workload.first_svid_seconds = time.monotonic() - workload.child.started
        await self._wait(
            f"agent {workload.name} writes its SVID to {workload.certs}",
            lambda: (workload.certs / "cert-chain.pem").exists(),
        )
        found = _PROXY_PORT.search(line)
        if found is None:
            raise DemoError(f"agent {workload.name} names no proxy port: {line}")
        workload.proxy_port = int(found.group(1))
        self.detail(
            f"  {workload.name}: {workload.spiffe_id}, first SVID "
            f"{workload.first_svid_seconds:.1f}s after the process started (serial "
            f"{workload.serial()[:12]}), proxy on 127.0.0.1:{workload.proxy_port}"
        )

    async def start_agents(self) -> None:
        self.step("Agents: each makes its key, gets an SVID, serves it to its mTLS proxy")
        pin = await self._root_pin()
        for name, spiffe_id in (
            ("backend", BACKEND),
            ("frontend", FRONTEND),
            ("intruder", INTRUDER),
        ):
            workload = Workload(name, spiffe_id, self.directory / name)
            workload.directory.mkdir()
            self.workloads[name] = workload
        backend, frontend, intruder = self.workloads.values()

        policy = backend.directory / "policy.yaml"
        policy.write_text(yaml.safe_dump({"listeners": {"127.0.0.1:0": {"allow": [FRONTEND]}}}))
        self.detail(
            f"backend: Kubernetes token; inbound mTLS -> app on 127.0.0.1:{self.app_port}; "
            "policy: only frontend may call"
        )
        config = self._agent_config(
            backend,
            pin,
            credential="k8s",
            token_file=self._token(backend, "backend"),
            inbound=[f"127.0.0.1:0=127.0.0.1:{self.app_port},http"],
            proxy_policy=str(policy),
        )
        await self._start_agent(backend, config)

        await self._agent_ready(backend)
        route = f"127.0.0.1:0=127.0.0.1:{backend.proxy_port},{BACKEND},http"
        self.detail("frontend: Kubernetes token; outbound to the backend's proxy")
        frontend_config = self._agent_config(
            frontend,
            pin,
            credential="k8s",
            token_file=self._token(frontend, "frontend"),
            outbound=[route],
        )
        self.detail("intruder: a machine outside Kubernetes, with a join token; outbound too")
        output = await self.admin(
            "join-token",
            "create",
            "--config",
            str(self.config),
            "--spiffe-id",
            "/vm/intruder",
            lines=0,
        )
        token_file = intruder.directory / "join-token"
        token_file.write_text(output.splitlines()[0].strip() + "\n")
        token_file.chmod(0o600)
        self.detail(f"  token written to {token_file} (the database keeps only its SHA-256)")
        intruder_config = self._agent_config(
            intruder,
            pin,
            credential="join-token",
            token_file=str(token_file),
            outbound=[route],
        )
        await self._start_agent(frontend, frontend_config)
        await self._start_agent(intruder, intruder_config)
        await self._agent_ready(frontend)
        await self._agent_ready(intruder)

    async def requests(self) -> None:
        self.step("Requests frontend -> backend: plain HTTP to the frontend's proxy, mTLS between")
        frontend, backend = self.workloads["frontend"], self.workloads["backend"]
        log = AccessLog(backend.directory / "access.log")
        log.new_entries()  # from here on
        for n in range(3):
            status, body = await self._first_requests(frontend.proxy_port, n)
            self.detail(f"GET http://127.0.0.1:{frontend.proxy_port}/hello -> {status} {body}")
        self.detail(f"the backend's proxy logged ({backend.directory / 'access.log'}):")
        for entry in [e for e in await log.wait_for(3) if e.get("method")][:3]:
            self.detail(f"  {describe(entry)}")
        self._backend_log = log

    async def _first_requests(self, port: int, n: int) -> tuple[int, str]:
        """The first request may meet a proxy that has not loaded its SVID yet (the agent
        prints its ready line as it hands it over): retried for a moment, then a failure."""
        deadline = time.monotonic() + 5.0
        while True:
            try:
                return await get(port, "/hello")
            except (aiohttp.ClientError, TimeoutError) as exc:
                if n > 0 or time.monotonic() > deadline:
                    raise DemoError(
                        f"a request through the frontend's proxy failed: {exc!r}"
                    ) from None
                await asyncio.sleep(0.2)

    async def intruder(self) -> None:
        self.step("The intruder: a valid SVID, but not allowed by the backend's policy")
        intruder = self.workloads["intruder"]
        try:
            status, body = await get(intruder.proxy_port, "/secrets")
        except (aiohttp.ClientError, TimeoutError) as exc:  # the expected outcome
            outcome = f"refused ({type(exc).__name__}: the backend's proxy closed the connection)"
        else:
            raise DemoError(f"the intruder's request was answered ({status} {body}): policy failed")
        self.detail(f"GET http://127.0.0.1:{intruder.proxy_port}/secrets -> {outcome}")
        denied = [e for e in await self._backend_log.wait_for(1) if e.get("decision") == "deny"]
        if not denied:
            raise DemoError("the backend's proxy logged no refusal of the intruder")
        self.detail(f"the backend's proxy logged: {describe(denied[0])}")
        token = (intruder.directory / "join-token").read_text().strip()
        code, message = await self._create_certificate(token)
        self.detail(f"its join token, used again: {code}: {message}")

    async def _create_certificate(self, token: str) -> tuple[str, str]:
        """Call IstioCertificateService/CreateCertificate with ``token``: (status, message)."""
        pem = (self.workloads["intruder"].certs / "root-cert.pem").read_bytes()
        credentials = grpc.ssl_channel_credentials(root_certificates=pem)
        _, csr = await asyncio.to_thread(new_key_and_csr, KeyAlgorithm.EC_P256, None)
        async with grpc.aio.secure_channel(
            self.ca_ports["grpc"],
            credentials,
            options=[("grpc.ssl_target_name_override", "localhost")],
        ) as channel:
            stub = istioca_pb2_grpc.IstioCertificateServiceStub(channel)
            try:
                await stub.CreateCertificate(
                    istioca_pb2.IstioCertificateRequest(csr=csr),
                    metadata=[("authorization", f"Bearer {token}")],
                    timeout=10,
                )
            except grpc.aio.AioRpcError as exc:
                return exc.code().name, exc.details() or ""
        raise DemoError("the CA issued a second certificate for one join token")

    async def _renew(self, workloads: list[Workload], until: Callable[[Workload], bool]) -> None:
        """SIGHUP each agent (renew now) until ``until`` holds for its new certificate."""
        deadline = time.monotonic() + STEP_TIMEOUT
        pending = list(workloads)
        while pending:
            before = {w.name: w.serial() for w in pending}
            for workload in pending:
                assert workload.child is not None
                workload.child.send(signal.SIGHUP)
            while any(w.serial() == before[w.name] for w in pending):
                if time.monotonic() > deadline:
                    raise DemoError(
                        "no new certificate within "
                        f"{STEP_TIMEOUT:g}s for {', '.join(w.name for w in pending)}"
                    )
                await asyncio.sleep(0.05)
            pending = [w for w in pending if not until(w)]
            if pending:
                await asyncio.sleep(0.5)

    async def rotate_certificates(self) -> None:
        self.step("Certificate rotation under traffic (a request every 100 ms from here on)")
        self.detail("every agent renews now (SIGHUP; on their own they renew at half life):")
        before = {w.name: w.serial() for w in self.workloads.values()}
        workloads = list(self.workloads.values())
        await self._renew(workloads, lambda w: True)
        for workload in workloads:
            self.detail(
                f"  {workload.name}: serial {before[workload.name][:12]} -> "
                f"{workload.serial()[:12]}"
            )
        await asyncio.sleep(1.0)
        self._traffic_report()

    def _traffic_report(self) -> None:
        assert self.traffic is not None
        self.detail(
            f"traffic so far: {self.traffic.ok} requests answered, "
            f"{len(self.traffic.failed)} failed"
        )
        if self.traffic.failed:
            raise DemoError("requests failed:\n  " + "\n  ".join(self.traffic.failed[:10]))

    async def _wait(self, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + STEP_TIMEOUT
        while not check():
            if time.monotonic() > deadline:
                raise DemoError(f"not within {STEP_TIMEOUT:g}s: {what}")
            await asyncio.sleep(0.1)

    async def rotate_root(self) -> None:
        self.step("Root rotation under traffic: prepare, activate, retire")
        workloads = list(self.workloads.values())
        config = ("--config", str(self.config))
        old = workloads[0].root_fingerprint()
        output = await self.admin("root", "prepare", *config, match="^root ")
        found = re.search(r"root ([0-9a-f]{64}) prepared", output)
        if found is None:
            raise DemoError(f"`root prepare` named no root:\n{output}")
        new = found.group(1)
        prepared = time.monotonic()
        await self._wait(
            "every agent's trust bundle holds both roots",
            lambda: all(len(w.bundle()) == 2 for w in workloads),
        )
        self.detail("every agent's trust bundle now holds both roots")
        await asyncio.sleep(max(0.0, prepared + PROPAGATION_SECONDS + 0.2 - time.monotonic()))
        await self.admin("root", "activate", new[:16], *config, lines=1)
        assert self.ca is not None
        await self.ca.ready_line(f"root {new[:16]} is now active", STEP_TIMEOUT, anywhere=True)
        self.detail("the CA signs with the new root (a new intermediate, a new TLS certificate)")
        await self._renew(workloads, lambda w: w.root_fingerprint() == new)
        self.detail(f"every agent renewed: its SVID now chains to root {new[:16]}")
        await self.admin("root", "retire", old[:16], *config, expect=1, lines=1)
        self.detail(
            "(refused, as it should be: certificates under the old root are unexpired; none is "
            "in use any more, so:)"
        )
        await self.admin("root", "retire", old[:16], "--force", *config, lines=1)
        await self._wait(
            "every agent's trust bundle holds the new root only",
            lambda: all([fingerprint(c) for c in w.bundle()] == [new] for w in workloads),
        )
        self.detail("every agent's trust bundle now holds the new root only")
        await asyncio.sleep(1.0)
        self._traffic_report()

    async def ledger(self) -> None:
        assert self.traffic is not None
        await self.traffic.stop()
        if self.traffic.failed:
            self._traffic_report()
        self.step("The ledger: every certificate issued, hash-chained")
        config = ("--config", str(self.config))
        output = await self.admin("status", *config, "-o", "json", lines=0)
        counts = json.loads(output)["counts"]
        by_method = ", ".join(f"{n} by {m}" for m, n in sorted(counts["by_method"].items()))
        self.detail(f"  {counts['ledger_rows']} certificates: {by_method}")
        await self.admin("ledger", "verify", *config, lines=1)

    async def summary(self) -> None:
        assert self.traffic is not None
        took = time.monotonic() - self.started
        agents = ", ".join(f"{w.name} {w.first_svid_seconds:.1f}s" for w in self.workloads.values())
        self.say(
            f"""
Done in {took:.1f}s. What ran:
  a CA (root key in {self.hsm}), three agents with their mTLS proxies, an HTTP backend
  frontend -> backend: {self.traffic.ok} requests over mTLS, 0 failed, through a
    certificate rotation and a root rotation
  intruder: refused by the backend's policy; its spent join token refused by the CA
  agent start to first SVID: {agents}
Files, in {self.directory}:
  meshca.yaml            the CA's configuration; ca/ its state (SQLite ledger meshca.db)
  backend/, frontend/, intruder/
                         agent.yaml, certs/ (SVID, key, trust bundle), access.log
  logs/                  every process's output
Next: README.md shows how to run the CA for real and join a VM or laptop with a join
  token{"" if self.keep else f"; {self.shown_as} demo --keep leaves all this running"}."""
        )

    def keep_instructions(self) -> str:
        frontend, intruder = self.workloads["frontend"], self.workloads["intruder"]
        http = self.ca_ports["http"]
        m = self.shown_as
        pid = frontend.child.pid if frontend.child else 0
        return f"""
Still running; Ctrl-C stops every process. Try:
  curl http://127.0.0.1:{frontend.proxy_port}/          # frontend -> backend over mTLS
  curl http://127.0.0.1:{intruder.proxy_port}/          # the intruder: refused
  tail -f {self.directory}/backend/access.log
  openssl x509 -noout -text -in {frontend.certs}/cert-chain.pem
  kill -HUP {pid}                                       # the frontend's agent renews now
  curl http://{http}/v1/bundle                          # the trust bundle (PEM)
  curl -s http://{http}/metrics | grep ^meshca_
  export MESHCA_CONFIG={self.config}
  {m} admin status
  {m} admin ledger list
  {m} admin join-token create --spiffe-id /vm/laptop    # then: {m} admin join-token list"""


async def _main(demo: Demo, keep: bool) -> int:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    interrupted: list[int] = []
    cleaning = False

    def on_signal(sig: signal.Signals) -> None:
        if interrupted or cleaning:  # stopping already: kill what is left, at once
            demo.children.kill_all()
            return
        interrupted.append(sig)
        main.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig)
    code = 0
    finished = False
    try:
        await demo.run()
        finished = True
        if keep:
            demo.say(demo.keep_instructions())
            await asyncio.Event().wait()
    except asyncio.CancelledError:
        if not interrupted:
            raise
        name = signal.Signals(interrupted[0]).name
        demo.say(f"\n{name}: stopping every process the demo started")
        code = 0 if finished else 128 + interrupted[0]  # --keep ends with Ctrl-C
    except DemoError as exc:
        demo.say(f"\nmeshca demo failed: {exc.message}")
        code = 1
    finally:
        cleaning = True
        if demo.traffic is not None:
            await demo.traffic.stop()
        await demo.children.stop_all()
        if demo.backend_app is not None:
            await demo.backend_app.cleanup()
        demo.say(f"stopped; the files are in {demo.directory}")
    return code


def run_demo(*, keep: bool, shown_as: str) -> int:
    """Run the demo; the exit status (0, 1 when a step failed, 128+signal)."""
    demo = Demo(shown_as=shown_as, keep=keep)
    return asyncio.run(_main(demo, keep))
