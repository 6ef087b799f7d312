"""Security: bounds on peer input, mesh identity (CA, bundles), ACLs, signed
control frames and sealed tensors. ``bounds`` is dependency-free; the crypto
modules import ``cryptography`` lazily (only when a bundle is used)."""
