"""SecAgg+ (Bell et al., CCS 2020) on our own round loop: the client's and the server's stages, their wire format,
masking, device identities and the cryptographic building blocks (on `cryptography`, no Flower)."""
