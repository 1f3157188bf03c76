"""The language-model study's models: a small causal transformer, named ``gpt-<layers>x<width>``.

Pre-norm blocks (LayerNorm, causal self-attention through ``F.scaled_dot_product_attention``, a
4x GELU MLP), learned positions, a final LayerNorm and an untied output head. ``hidden(tokens)``
returns the final hidden states and ``head`` is the projection, so the distillation losses take
hidden states and weights (``fastkd.fused_linear_*``) and never need the logits; ``forward`` is
``head(hidden(tokens))`` for evaluation. Heads are 32 wide (one head below width 32).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

# the language-model study's defaults, filled in by StudyConfig.resolved() for --task lm
# (sized for a few minutes on 2 CPU cores: the teacher reaches a validation perplexity near 80)
LM_DEFAULTS = dict(teacher="gpt-2x128", student="gpt-2x64", epochs=4, teacher_epochs=8, lr=3e-3, batch_size=32,
                   corpus_chars=300_000, vocab_size=2048, seq_len=64, sparse_k=[4, 16])
# the top-K tails the study trains a student with; "conditional" (TRL's server loss without its tail)
# is left out: it leaves the student's off-list mass to the CE term alone, a question about TRL's
# loss rather than about what a truncated teacher does to calibration
LM_TAILS = ("bucket", "renormalize", "lumped")
NAME = re.compile(r"gpt-([1-9][0-9]*)x([1-9][0-9]*)")
HEAD_WIDTH = 32


def parse_lm_model(name: str) -> tuple[int, int]:
    """``"gpt-4x128"`` -> (layers 4, width 128); a ValueError naming the model otherwise."""
    m = NAME.fullmatch(str(name))
    if m is None:
        raise ValueError(f"unknown language model {name!r}: name it gpt-<layers>x<width>, e.g. gpt-4x128")
    layers, width = int(m[1]), int(m[2])
    if width > HEAD_WIDTH and width % HEAD_WIDTH:
        raise ValueError(f"language model {name!r}: a width above {HEAD_WIDTH} must be a multiple of {HEAD_WIDTH} "
                         "(the attention heads' width)")
    return layers, width


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.heads = max(1, width // HEAD_WIDTH)
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # position i sees positions <= i only
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.ln2(x))


class CausalLM(nn.Module):
    def __init__(self, vocab: int, layers: int, width: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        for m in self.modules():  # GPT-2's initialisation scale (PyTorch's default is too wide here)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, positions) token ids -> (batch, positions, width) final hidden states."""
        n = tokens.shape[-1]
        if n > self.max_len:
            raise ValueError(f"sequences of {n} tokens; this model was built for at most {self.max_len}")
        x = self.embed(tokens) + self.pos(torch.arange(n, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(tokens))


def build_lm(name: str, vocab: int, max_len: int) -> CausalLM:
    layers, width = parse_lm_model(name)
    return CausalLM(vocab, layers, width, max_len)
