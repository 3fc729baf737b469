"""Passes. Model passes rewrite an nn.Module before export (taps, prune points): pruning changes sequence
lengths, and an exported graph bakes lengths into every reshape, so tokens are dropped before `torch.export`
traces the shapes. Graph passes rewrite the exported program for a target (op lowering)."""
