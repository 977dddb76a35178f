"""Key backends behind the Signer seam: file now; PKCS#11 and Cloud KMS plug in here."""
