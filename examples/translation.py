"""Machine translation with an encoder-decoder transformer: the decoder's causal
self-attention reads what it has written so far, and its cross-attention (L target
tokens over S != L source tokens) reads the source sentence.

The language pair is made up, so it needs no download: the target language writes
the words in reverse order, drops the particles, and spells some words with two
tokens, so source and target lengths differ and every output token has to find its
source word by attention. Greedy decoding; prints token and sentence accuracy.

    python examples/translation.py [--steps 1000] [--seed 0]
"""

from __future__ import annotations

import torch
from torch import nn

import common
from attn_kernels.nn import CrossAttentionBlock, SelfAttentionBlock

BOS, EOS = 1, 2  # PAD = 0
SRC_WORDS = 24  # source ids 3..26
PARTICLES = range(3, 6)  # dropped in translation
COMPOUNDS = range(6, 12)  # two target tokens each
MIN_WORDS, MAX_WORDS = 4, 10
MAX_LEN = 2 * MAX_WORDS + 2


def make_lexicon() -> dict:
    """source word -> its target tokens; fixed (not --seed) so every run learns the same language."""
    order = torch.randperm(SRC_WORDS + len(COMPOUNDS), generator=torch.Generator().manual_seed(1234)) + 3
    targets = iter(order.tolist())
    lexicon = {}
    for word in range(3, 3 + SRC_WORDS):
        if word in PARTICLES:
            lexicon[word] = []
        elif word in COMPOUNDS:
            lexicon[word] = [next(targets), next(targets)]
        else:
            lexicon[word] = [next(targets)]
    return lexicon


LEXICON = make_lexicon()
TGT_VOCAB = 3 + SRC_WORDS + len(COMPOUNDS)


def translate(sentence: list) -> list:
    """The reference translation: reversed word order, each word looked up."""
    return [token for word in reversed(sentence) for token in LEXICON[word]]


def make_batch(generator: torch.Generator, size: int, device):
    """(source (B, S), decoder input (B, T), decoder target (B, T)); the target ends in EOS."""
    sources, targets = [], []
    while len(sources) < size:
        length = int(torch.randint(MIN_WORDS, MAX_WORDS + 1, (1,), generator=generator))
        sentence = (torch.randint(3, 3 + SRC_WORDS, (length,), generator=generator)).tolist()
        if translate(sentence):  # all particles: nothing to say
            sources.append(sentence)
            targets.append(translate(sentence) + [EOS])
    target = common.pad_batch(targets)
    decoder_in = common.pad_batch([[BOS] + t[:-1] for t in targets])
    return common.pad_batch(sources).to(device), decoder_in.to(device), target.to(device)


class Translator(nn.Module):
    def __init__(self, dim: int = 64, num_heads: int = 4, depth: int = 2):
        super().__init__()
        self.src_embed = common.TokenEmbedding(3 + SRC_WORDS, dim, MAX_LEN)
        self.tgt_embed = common.TokenEmbedding(TGT_VOCAB, dim, MAX_LEN)
        self.encoder = common.Encoder(dim, num_heads, depth)
        # decoder layer = causal self-attention block, then cross-attention block
        self.decoder_self = nn.ModuleList(SelfAttentionBlock(dim, num_heads, causal=True) for _ in range(depth))
        self.decoder_cross = nn.ModuleList(CrossAttentionBlock(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, TGT_VOCAB)

    def encode(self, source: torch.Tensor):
        padding = source == common.PAD
        return self.encoder(self.src_embed(source), padding), padding

    def decode(self, decoder_in: torch.Tensor, memory: torch.Tensor, memory_padding: torch.Tensor):
        # no target padding mask: padding sits after every real token, and causal
        # attention never looks ahead; the loss ignores padded positions
        y = self.tgt_embed(decoder_in)
        for self_block, cross_block in zip(self.decoder_self, self.decoder_cross):
            y = cross_block(self_block(y), memory, memory_padding)
        return self.head(self.norm(y))

    def forward(self, source, decoder_in):
        return self.decode(decoder_in, *self.encode(source))

    @torch.no_grad()
    def greedy(self, source: torch.Tensor, max_len: int = MAX_LEN) -> torch.Tensor:
        """(B, S) -> (B, max_len) tokens, PAD after each sentence's EOS."""
        memory, padding = self.encode(source)
        out = torch.full((len(source), 1), BOS, dtype=torch.long, device=source.device)
        done = torch.zeros(len(source), dtype=torch.bool, device=source.device)
        for _ in range(max_len):
            token = self.decode(out, memory, padding)[:, -1].argmax(-1)
            token = token.masked_fill(done, common.PAD)
            out = torch.cat([out, token[:, None]], dim=1)
            done |= token == EOS
            if done.all():
                break
        return out[:, 1:]


def evaluate(model: Translator, generator: torch.Generator, size: int, device) -> dict:
    model.eval()
    source, _, target = make_batch(generator, size, device)
    decoded = model.greedy(source)
    width = max(decoded.shape[1], target.shape[1])
    decoded = nn.functional.pad(decoded, (0, width - decoded.shape[1]))
    target = nn.functional.pad(target, (0, width - target.shape[1]))
    real = target != common.PAD
    correct = (decoded == target) & real
    return {
        "token_accuracy": correct.sum().item() / real.sum().item(),
        "sentence_accuracy": (decoded == target).all(dim=1).float().mean().item(),
    }


def main(argv=None) -> dict:
    run = common.Run(__doc__, default_steps=1000, argv=argv)
    model = Translator().to(run.device)
    loss_fn = nn.CrossEntropyLoss(ignore_index=common.PAD)

    def batch_loss(step):
        source, decoder_in, target = make_batch(run.data, 64, run.device)
        return loss_fn(model(source, decoder_in).flatten(0, 1), target.flatten())

    losses = common.train(model, batch_loss, run.steps, lr=1e-3)
    metrics = evaluate(model, run.held_out(), 500, run.device)
    return run.finish("translation (greedy decoding, held-out sentences)", losses, metrics)


if __name__ == "__main__":
    main()
