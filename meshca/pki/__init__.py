"""Certificate profiles, CSR checks and trust bundles. cryptography does all encoding."""
