"""meshca inside Kubernetes: the trust bundle ConfigMap in every namespace.

``client`` builds the Kubernetes API client (the official ``kubernetes`` package, its
asyncio flavour) from :class:`meshca.config.BundleConfigMapConfig`; ``lease`` elects one
writer among the CA processes with a coordination.k8s.io/v1 Lease; ``bundle_configmaps``
is what the writer does.
"""
