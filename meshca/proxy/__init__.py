"""meshca's mTLS sidecar proxy (``meshca proxy``): the data plane that ships with meshca.

The proxy, not the application, does the mutual TLS handshake with the agent's
X509-SVID, decides by the peer's SPIFFE ID whether the call may go on, and writes one
access-log line per connection (and per request on HTTP/1.1 listeners) naming the peer.

    config.py      listener specs (``--inbound`` / ``--outbound``) and limits
    tls.py         SSL contexts rebuilt on every rotation; the X509-SVID peer checks
    policy.py      allow / deny lists of SPIFFE IDs per inbound listener, reloaded on change
    accesslog.py   JSON lines to stdout or a file, reopened on SIGHUP or rotation
    relay.py       the byte pump between two transports (flow control, counters)
    http.py        per-request accounting on HTTP/1.1 listeners (httptools)
    listeners.py   inbound (mTLS in, plain to the app) and outbound (plain in, mTLS out)
    source.py      credentials from the SPIFFE Workload API socket
    run.py         composition: one process, or N workers sharing ports (SO_REUSEPORT)
"""
