"""``meshca demo``: a CA, agents, proxies and an application on loopback, shown step by
step (see :mod:`meshca.demo.run`)."""
