"""Node authorization: may this node agent obtain that workload's identity?

A node agent (one per Kubernetes node, a DaemonSet) serves the pods of its node. It
authenticates with its own projected service-account token and names the identity it
wants: Istio's ``ImpersonatedIdentity`` in the request ``metadata`` Struct (the field
Istio's ztunnel sends), or the ``meshca-impersonated-identity`` header on the MeshCA API.
The CA allows it only when all of these hold, and otherwise refuses with a
:class:`~meshca.errors.PolicyError` whose ``reason`` says which did not:

1. ``not_a_node_agent``: the caller's service account is listed in
   ``node_agents.service_accounts``, and its token came from ``node_agents.cluster_id``;
2. ``agent_token_not_pod_bound``: the token is bound to a pod (projected tokens are; the
   pod's name and UID are in its claims or the TokenReview extras);
3. ``agent_pod_gone`` / ``agent_pod_replaced`` / ``agent_pod_mismatch`` /
   ``agent_pod_not_running``: the API server has that pod, with that UID, running under
   the agent's service account, scheduled on a node (``spec.nodeName``);
   ``agent_node_mismatch``: the node the token itself names (Kubernetes 1.30+) is that
   node;
4. ``impersonation_not_a_pod_identity``: the identity asked for is a Kubernetes workload
   ID, ``spiffe://<trust domain>/ns/<namespace>/sa/<service account>``;
5. ``identity_not_on_node``: a pod with that service account in that namespace is
   scheduled on the agent's node and not finished (phase Pending or Running: native
   sidecars and init containers run while a pod is Pending).

Pods are read through :class:`~meshca.kube.pods.PodDirectory` (a short per-node cache that
never answers past its TTL); when the API server cannot be asked the request is refused
with ``pod_lookup_unavailable`` (UNAVAILABLE: retry), never guessed.

Agents outside Kubernetes (one per VM, several workloads) have nothing to look up; the
CA's ``node_agents.delegations`` lists, for an agent's exact SPIFFE ID, the exact IDs it
may obtain (``delegation_not_listed`` otherwise).

What this does not defend: a node agent whose node is compromised obtains the identities
of every pod scheduled on that node (which it could take from those pods anyway), and of
a pod for up to ``pod_cache_ttl`` after the pod was deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from meshca.authn.base import Attestation, AuthMethod
from meshca.config import NodeAgentsConfig
from meshca.errors import PolicyError, SpiffeIdError
from meshca.kube.podinfo import PodInfo, PodLookupError
from meshca.spiffe import SpiffeId, TrustDomain

if TYPE_CHECKING:  # the Kubernetes client is large: loaded only when node agents are set
    from meshca.kube.pods import PodDirectory

log = logging.getLogger(__name__)

KUBERNETES_METHODS = frozenset({AuthMethod.K8S_JWT, AuthMethod.K8S_TOKEN_REVIEW})
ISTIO_METADATA_KEY = "ImpersonatedIdentity"
MESHCA_HEADER = "meshca-impersonated-identity"


def _refuse(reason: str, message: str) -> PolicyError:
    return PolicyError(message, reason=reason)


class NodeAuthorizer:
    """Decides requests for another identity; see the module docstring.

    ``pods`` is required when ``config.service_accounts`` is set; ``cluster_id`` is the
    cluster the agents' tokens come from.
    """

    def __init__(
        self,
        trust_domain: TrustDomain,
        config: NodeAgentsConfig,
        *,
        cluster_id: str | None,
        pods: PodDirectory | None,
    ) -> None:
        if config.service_accounts and (pods is None or cluster_id is None):
            raise ValueError("node agent service accounts need a pod directory and a cluster")
        self._trust_domain = trust_domain
        self._accounts = frozenset(config.service_accounts)
        self._cluster = cluster_id
        self._pods = pods
        self._delegations = {
            SpiffeId.parse(d.agent): frozenset(SpiffeId.parse(i) for i in d.spiffe_ids)
            for d in config.delegations
        }

    async def close(self) -> None:
        if self._pods is not None:
            await self._pods.close()

    async def authorize(self, agent: Attestation, requested: str) -> Attestation:
        """The Attestation to issue ``requested`` under, on ``agent``'s behalf; raises
        PolicyError naming the rule that refused it."""
        target = self._parse(requested)
        if target == agent.spiffe_id:
            return agent
        allowed = self._delegations.get(agent.spiffe_id)
        if allowed is not None:
            if target not in allowed:
                raise _refuse(
                    "delegation_not_listed",
                    f"{agent.spiffe_id} may not obtain {target}: it is not among the "
                    "identities node_agents.delegations lists for this agent",
                )
            return Attestation(
                spiffe_id=target,
                method=agent.method,
                selectors=(*agent.selectors, f"meshca:delegated-by:{agent.spiffe_id}"),
                expires_at=agent.expires_at,
                delegated_by=agent.spiffe_id,
            )
        namespace, account = self._check_agent(agent)
        node, agent_pod = await self._agent_node(agent, namespace, account)
        target_ns, target_sa = self._workload(target)
        pod = await self._lookup(lambda: self._on_node(node, target_ns, target_sa))
        if pod is None:
            raise _refuse(
                "identity_not_on_node",
                f"{agent.spiffe_id} (on node {node}) may not obtain {target}: no running pod "
                f"with service account {target_sa} in namespace {target_ns} is scheduled on "
                f"node {node}",
            )
        log.debug(
            "node agent %s on node %s obtains %s for %s", agent.spiffe_id, node, target, pod.name
        )
        return Attestation(
            spiffe_id=target,
            method=agent.method,
            selectors=(
                f"k8s:cluster:{self._cluster}",
                f"k8s:node-name:{node}",
                f"k8s:ns:{target_ns}",
                f"k8s:sa:{target_sa}",
                f"k8s:pod-name:{pod.name}",
                f"k8s:pod-uid:{pod.uid}",
                f"k8s:agent-pod-name:{agent_pod.name}",
                f"k8s:agent-pod-uid:{agent_pod.uid}",
            ),
            expires_at=agent.expires_at,
            delegated_by=agent.spiffe_id,
            node=node,
        )

    # -- the rules ----------------------------------------------------------------------

    def _parse(self, requested: str) -> SpiffeId:
        try:
            target = SpiffeId.parse(requested)
        except SpiffeIdError as exc:
            raise _refuse(
                "impersonation_invalid_id",
                f"the impersonated identity {requested[:120]!r} is not a SPIFFE ID: {exc}",
            ) from None
        if not target.member_of(self._trust_domain) or target.is_trust_domain_id:
            raise _refuse(
                "impersonation_invalid_id",
                f"the impersonated identity {target} is not a workload in trust domain "
                f"{self._trust_domain}",
            )
        return target

    def _check_agent(self, agent: Attestation) -> tuple[str, str]:
        namespace, account = agent.selector("k8s:ns"), agent.selector("k8s:sa")
        trusted = (
            agent.method in KUBERNETES_METHODS
            and namespace is not None
            and account is not None
            and agent.selector("k8s:cluster") == self._cluster
            and f"{namespace}/{account}" in self._accounts
        )
        if not trusted or namespace is None or account is None:
            raise _refuse(
                "not_a_node_agent",
                f"{agent.spiffe_id} may not obtain other identities: only node agents (the "
                "service accounts in the CA's node_agents, authenticated with their "
                "Kubernetes token) may; each workload must otherwise present its own "
                "credential",
            )
        return namespace, account

    async def _agent_node(
        self, agent: Attestation, namespace: str, account: str
    ) -> tuple[str, PodInfo]:
        name, uid = agent.selector("k8s:pod-name"), agent.selector("k8s:pod-uid")
        if name is None or uid is None:
            raise _refuse(
                "agent_token_not_pod_bound",
                f"the token of node agent {agent.spiffe_id} is not bound to a pod, so its "
                "node cannot be known: mount a projected service-account token",
            )
        pod = await self._lookup(lambda: self._pod(namespace, name))
        if pod is None:
            raise _refuse(
                "agent_pod_gone",
                f"node agent pod {namespace}/{name}, to which the token is bound, does not "
                "exist (any more)",
            )
        if pod.uid != uid:
            raise _refuse(
                "agent_pod_replaced",
                f"node agent pod {namespace}/{name} is now uid {pod.uid}; the token was "
                f"bound to uid {uid}, a pod that no longer exists",
            )
        if pod.service_account != account:
            raise _refuse(
                "agent_pod_mismatch",
                f"node agent pod {namespace}/{name} runs as service account "
                f"{pod.service_account}, not {account}",
            )
        if not pod.active or pod.node_name is None:
            raise _refuse(
                "agent_pod_not_running",
                f"node agent pod {namespace}/{name} is not running on a node (phase "
                f"{pod.phase}, node {pod.node_name or 'none'})",
            )
        claimed = agent.selector("k8s:node-name")
        if claimed is not None and claimed != pod.node_name:
            raise _refuse(
                "agent_node_mismatch",
                f"the token of node agent {namespace}/{name} names node {claimed}, but the "
                f"pod is scheduled on {pod.node_name}",
            )
        return pod.node_name, pod

    def _workload(self, target: SpiffeId) -> tuple[str, str]:
        parts = target.path.split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not parts[2] or not parts[4]:
            raise _refuse(
                "impersonation_not_a_pod_identity",
                f"a node agent may obtain only Kubernetes workload identities "
                f"(spiffe://{self._trust_domain}/ns/<namespace>/sa/<service account>), "
                f"not {target}",
            )
        return parts[2], parts[4]

    async def _pod(self, namespace: str, name: str) -> PodInfo | None:
        assert self._pods is not None
        return await self._pods.pod(namespace, name)

    async def _on_node(self, node: str, namespace: str, account: str) -> PodInfo | None:
        assert self._pods is not None
        return await self._pods.find_on_node(
            node,
            lambda pod: (
                pod.active and pod.namespace == namespace and pod.service_account == account
            ),
        )

    @staticmethod
    async def _lookup(ask: Callable[[], Awaitable[PodInfo | None]]) -> PodInfo | None:
        try:
            return await ask()
        except PodLookupError as exc:
            log.warning("node authorization: %s", exc.message)
            raise _refuse(
                "pod_lookup_unavailable",
                f"the CA could not check the node's pods with the Kubernetes API: {exc.message}",
            ) from None
