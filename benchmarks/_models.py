"""The small transformer the benchmark workers train (imported by their child processes).

Example::

    from benchmarks._models import TinyLM
    model = TinyLM(vocab=512, d=128, layers=4)
"""

from __future__ import annotations

from torch import nn


class Block(nn.Module):
    """Pre-norm attention + MLP block."""

    def __init__(self, d: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Embedding, ``layers`` blocks (``layers.N``: the paths layer folding turns into ``layers.*``), head."""

    def __init__(self, vocab: int = 512, d: int = 128, layers: int = 4, heads: int = 4, mlp_ratio: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d, heads, mlp_ratio) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))
