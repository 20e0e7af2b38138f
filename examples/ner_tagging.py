"""Named-entity tagging with self-attention, plus a sentence-level head that pools
the tokens with learned-query attention (AttentionPooling).

Sentences are generated from templates ("Jordan said ...", "... flew to Jordan",
"Acme Labs hired ...") with BIO tags for PER / LOC / ORG. Some names are both people
and places, so a token's tag depends on its context: that is what the self-attention
has to read. Sentences have different lengths, so batches carry padding masks. The
sentence head predicts which entity types the sentence mentions.

    python examples/ner_tagging.py [--steps 1000] [--seed 0]
"""

from __future__ import annotations

import torch
from torch import nn

import common
from attn_kernels.nn import AttentionPooling

PEOPLE = ["Anna", "Ben", "Chen", "Dara", "Emeka", "Fatima", "Hiro", "Ines", "Kofi", "Lena"]
PLACES = ["Berlin", "Lagos", "Lima", "Oslo", "Kyoto", "Quito", "Hanoi", "Accra"]
BOTH = ["Jordan", "Sydney", "Florence", "Georgia", "Victoria", "Chad"]  # a person or a place
SURNAMES = ["Okafor", "Tanaka", "Silva", "Novak", "Haddad"]
COMPANIES = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay"]
SUFFIXES = ["Corp", "Inc", "Labs"]
FILLER = ["the", "a", "on", "Monday", "report", "deal", "after", "talks", "new", "plan", "and", "today",
          "quietly", "again", "with", "news", "for", "years"]
VERBS = ["said", "met", "visited", "hired", "praised", "left", "joined", "thanked"]
PREPOSITIONS = ["in", "to", "from", "near"]

WORDS = sorted(set(PEOPLE + PLACES + BOTH + SURNAMES + COMPANIES + SUFFIXES + FILLER + VERBS + PREPOSITIONS))
WORD_ID = {w: i + 1 for i, w in enumerate(WORDS)}  # 0 = PAD
TAGS = ["<pad>", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
TAG_ID = {t: i for i, t in enumerate(TAGS)}
TYPES = ["PER", "LOC", "ORG"]
MAX_LEN = 32


class SentenceMaker:
    """Draws tagged sentences from clause templates with a torch generator."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def pick(self, options):
        return options[common.randint(self.generator, 0, len(options))]

    def coin(self, p: float) -> bool:
        return float(torch.rand((), generator=self.generator)) < p

    def person(self):
        words = [self.pick(PEOPLE + BOTH)] + ([self.pick(SURNAMES)] if self.coin(0.4) else [])
        return words, "PER"

    def place(self):
        return [self.pick(PLACES + BOTH)], "LOC"

    def company(self):
        words = [self.pick(COMPANIES)] + ([self.pick(COMPANIES)] if self.coin(0.3) else [])
        return words + [self.pick(SUFFIXES)], "ORG"

    def clause(self):
        """A list of (words, entity type or None) chunks; the template says each name's type."""
        agent = self.person() if self.coin(0.7) else self.company()
        kind = common.randint(self.generator, 0, 4)
        if kind == 0:
            return [agent, (["said"], None)]
        if kind == 1:
            return [agent, ([self.pick(PREPOSITIONS)], None), self.place()]
        if kind == 2:
            return [agent, ([self.pick(VERBS)], None), self.person() if self.coin(0.5) else self.company()]
        return [([self.pick(PREPOSITIONS)], None), self.place(), (["the"], None), agent, ([self.pick(VERBS[:1])], None)]

    def sentence(self):
        chunks = []
        for _ in range(common.randint(self.generator, 1, 3)):
            chunks += self.clause()
            chunks += [([self.pick(FILLER)], None) for _ in range(common.randint(self.generator, 0, 3))]
        words, tags = [], []
        for chunk, kind in chunks:
            words += chunk
            tags += ["O"] * len(chunk) if kind is None else [f"B-{kind}"] + [f"I-{kind}"] * (len(chunk) - 1)
        return words[:MAX_LEN], tags[:MAX_LEN]


def make_batch(maker: SentenceMaker, size: int, device):
    """(word ids (B, T), tag ids (B, T), entity types present (B, 3) float), PAD-padded."""
    sentences = [maker.sentence() for _ in range(size)]
    words = common.pad_batch([[WORD_ID[w] for w in s] for s, _ in sentences])
    tags = common.pad_batch([[TAG_ID[t] for t in ts] for _, ts in sentences])
    present = torch.tensor([[float(f"B-{k}" in ts) for k in TYPES] for _, ts in sentences])
    return words.to(device), tags.to(device), present.to(device)


class Tagger(nn.Module):
    def __init__(self, dim: int = 64, num_heads: int = 4, depth: int = 2):
        super().__init__()
        self.embed = common.TokenEmbedding(len(WORDS) + 1, dim, MAX_LEN)
        self.encoder = common.Encoder(dim, num_heads, depth)
        self.tag_head = nn.Linear(dim, len(TAGS))
        # one learned query per entity type: each looks for its own kind of token
        self.pool = AttentionPooling(dim, num_heads=1, num_queries=len(TYPES))
        self.type_head = nn.Linear(dim, 1)

    def forward(self, words: torch.Tensor, return_weights: bool = False):
        padding = words == common.PAD
        tokens = self.encoder(self.embed(words), padding)
        pooled, weights = self.pool(tokens, padding, return_weights=True)
        out = (self.tag_head(tokens), self.type_head(pooled).squeeze(-1))  # (B, T, tags), (B, 3)
        return (*out, weights) if return_weights else out


def spans(tags: list) -> set:
    """{(start, end, type)} of the BIO tag ids in `tags` (a well-formed span starts with B-)."""
    found, start, kind = set(), None, None
    for i, tag in enumerate([TAGS[t] for t in tags] + ["O"]):
        if start is not None and tag != f"I-{kind}":
            found.add((start, i, kind))
            start = None
        if tag.startswith("B-"):
            start, kind = i, tag[2:]
    return found


def evaluate(model: Tagger, maker: SentenceMaker, size: int, device) -> dict:
    model.eval()
    words, tags, present = make_batch(maker, size, device)
    with torch.no_grad():
        tag_logits, type_logits = model(words)
    predicted = tag_logits.argmax(-1).masked_fill(words == common.PAD, common.PAD)
    hits = guessed = truth = 0
    for pred_row, true_row, word_row in zip(predicted.tolist(), tags.tolist(), words.tolist()):
        n = sum(w != common.PAD for w in word_row)
        p, t = spans(pred_row[:n]), spans(true_row[:n])
        hits, guessed, truth = hits + len(p & t), guessed + len(p), truth + len(t)
    precision, recall = hits / max(1, guessed), hits / max(1, truth)
    return {
        "tag_accuracy": common.masked_accuracy(tag_logits, tags),
        "entity_f1": 2 * precision * recall / max(1e-9, precision + recall),
        "sentence_types_accuracy": ((type_logits > 0) == (present > 0)).all(-1).float().mean().item(),
    }


def show_example(model: Tagger, maker: SentenceMaker, device) -> None:
    words, _, _ = make_batch(maker, 1, device)
    with torch.no_grad():
        tag_logits, _, weights = model(words, return_weights=True)
    names = [WORDS[w - 1] for w in words[0].tolist()]
    print("\nexample: " + " ".join(f"{w}/{TAGS[t]}" for w, t in zip(names, tag_logits[0].argmax(-1).tolist())))
    for kind, row in zip(TYPES, weights[0, 0]):  # (H=1, Q=3, T) -> the token each query looks at most
        print(f"  the {kind} query attends most to {names[int(row.argmax())]!r} ({row.max().item():.2f})")


def main(argv=None) -> dict:
    run = common.Run(__doc__, default_steps=1000, argv=argv)
    maker = SentenceMaker(run.data)
    model = Tagger().to(run.device)
    tag_loss = nn.CrossEntropyLoss(ignore_index=common.PAD)
    type_loss = nn.BCEWithLogitsLoss()

    def batch_loss(step):
        words, tags, present = make_batch(maker, 64, run.device)
        tag_logits, type_logits = model(words)
        return tag_loss(tag_logits.flatten(0, 1), tags.flatten()) + type_loss(type_logits, present)

    losses = common.train(model, batch_loss, run.steps, lr=2e-3)
    held_out = SentenceMaker(run.held_out())
    metrics = evaluate(model, held_out, 500, run.device)
    show_example(model, held_out, run.device)
    return run.finish("NER tagging (held-out sentences)", losses, metrics)


if __name__ == "__main__":
    main()
