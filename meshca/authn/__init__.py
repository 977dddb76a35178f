"""Authenticators: who is calling? Each turns a credential into an Attestation."""
