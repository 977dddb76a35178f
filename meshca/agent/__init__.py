"""The node agent: keys made locally, renewal before expiry, delivery to the data plane."""
