"""A stand-in GPT with the real model's parameter names, for optimizer and checkpoint tests.

tok_emb, pos_emb, blocks.{i} (2-D Linear weights, 1-D norms and biases), norm_f, lm_head.
"""

import torch
from torch import nn

VOCAB, D, CTX = 16, 8, 8


class Block(nn.Module):
    def __init__(self, d, dropout=0.0):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = nn.LayerNorm(d), nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class TinyGPT(nn.Module):
    def __init__(self, vocab=VOCAB, n_layer=2, tie=True, dropout=0.0):
        super().__init__()
        self.tok_emb, self.pos_emb = nn.Embedding(vocab, D), nn.Embedding(CTX, D)
        self.blocks = nn.ModuleList(Block(D, dropout) for _ in range(n_layer))
        self.norm_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm_f(x))
