"""Extractive summarization: pick the sentences of a document that belong in its
summary. A self-attention encoder reads the whole document (headline and sentences
at once), then AttentionPooling turns each sentence's tokens into one vector that a
linear head scores.

Documents are generated: a headline names the topic, and the summary is every
sentence that mentions the headline's topic. Sentences that mention some other
topic are distractors, so a sentence cannot be judged alone: it has to be read
against the headline, across the document. Documents have 3 to 6 sentences of 4
to 8 words, so padding masks work at both levels.

    python examples/summarization.py [--steps 300] [--seed 0]
"""

from __future__ import annotations

import torch
from torch import nn

import common
from attn_kernels.nn import AttentionPooling

TOPICS = ["economy", "football", "weather", "music", "science", "travel", "health", "film"]
FILLER = ["the", "a", "new", "report", "says", "after", "week", "city", "people", "more", "than", "last",
          "year", "will", "plan", "big", "local", "team", "show", "today", "many", "old", "could", "start",
          "again", "early", "late", "small", "open", "about", "record", "fans", "study", "price", "rain", "tour"]
VOCAB = ["<pad>"] + TOPICS + FILLER
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
MAX_SENTENCES, MAX_WORDS = 6, 8
DOC_LEN = 1 + MAX_SENTENCES * MAX_WORDS  # headline slot, then one fixed slot a sentence


def make_document(generator: torch.Generator):
    """(headline topic, sentences (lists of words), in-summary flags)."""
    randint = lambda low, high: common.randint(generator, low, high)  # noqa: E731
    headline = TOPICS[randint(0, len(TOPICS))]
    sentences, flags = [], []
    for _ in range(randint(3, MAX_SENTENCES + 1)):
        words = [FILLER[randint(0, len(FILLER))] for _ in range(randint(4, MAX_WORDS + 1))]
        mention = randint(0, 3)  # 0: none, 1: the headline's topic, 2: another topic
        if mention:
            others = [t for t in TOPICS if t != headline]
            words[randint(0, len(words))] = headline if mention == 1 else others[randint(0, len(others))]
        sentences.append(words)
        flags.append(mention == 1)
    if not any(flags):  # every document has a summary
        sentences[0][0], flags[0] = headline, True
    return headline, sentences, flags


def make_batch(generator: torch.Generator, size: int, device):
    """tokens (B, DOC_LEN); labels (B, MAX_SENTENCES) float; sentence exists (B, MAX_SENTENCES) bool."""
    tokens = torch.zeros(size, DOC_LEN, dtype=torch.long)
    labels = torch.zeros(size, MAX_SENTENCES)
    exists = torch.zeros(size, MAX_SENTENCES, dtype=torch.bool)
    docs = [make_document(generator) for _ in range(size)]
    for b, (headline, sentences, flags) in enumerate(docs):
        tokens[b, 0] = WORD_ID[headline]
        for s, (words, flag) in enumerate(zip(sentences, flags)):
            start = 1 + s * MAX_WORDS
            tokens[b, start : start + len(words)] = torch.tensor([WORD_ID[w] for w in words])
            labels[b, s], exists[b, s] = float(flag), True
    return tokens.to(device), labels.to(device), exists.to(device), docs


class Extractor(nn.Module):
    def __init__(self, dim: int = 64, num_heads: int = 4, depth: int = 2):
        super().__init__()
        self.embed = common.TokenEmbedding(len(VOCAB), dim, DOC_LEN)
        self.encoder = common.Encoder(dim, num_heads, depth)
        self.pool = AttentionPooling(dim, num_heads=2)
        self.score = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor, exists: torch.Tensor) -> torch.Tensor:
        """Logits (number of existing sentences,), in batch-then-sentence order."""
        padding = tokens == common.PAD
        states = self.encoder(self.embed(tokens), padding)
        # (B, S*W, dim) -> one row of W token states a sentence slot; keep the real sentences
        per_sentence = states[:, 1:].reshape(-1, MAX_WORDS, states.shape[-1])[exists.flatten()]
        word_padding = padding[:, 1:].reshape(-1, MAX_WORDS)[exists.flatten()]
        return self.score(self.pool(per_sentence, word_padding)).flatten()


def evaluate(model: Extractor, generator: torch.Generator, size: int, device) -> dict:
    model.eval()
    tokens, labels, exists, docs = make_batch(generator, size, device)
    with torch.no_grad():
        chosen = model(tokens, exists) > 0
    truth = labels[exists] > 0
    hits = (chosen & truth).sum().item()
    precision, recall = hits / max(1, chosen.sum().item()), hits / max(1, truth.sum().item())
    wrong = torch.zeros_like(labels, dtype=torch.bool)  # (B, sentences): a sentence misjudged
    wrong[exists] = chosen != truth
    show(docs[0], chosen[: len(docs[0][1])].tolist())
    return {
        "sentence_f1": 2 * precision * recall / max(1e-9, precision + recall),
        "summary_exact_match": (~wrong.any(dim=1)).float().mean().item(),
    }


def show(doc, chosen) -> None:
    headline, sentences, flags = doc
    print(f"\nexample document, headline '{headline}' (* = chosen for the summary, [true label]):")
    for words, pick, flag in zip(sentences, chosen, flags):
        print(f"  {'*' if pick else ' '} [{'summary' if flag else '-------'}] {' '.join(words)}")


def main(argv=None) -> dict:
    run = common.Run(__doc__, default_steps=300, argv=argv)
    model = Extractor().to(run.device)
    loss_fn = nn.BCEWithLogitsLoss()

    def batch_loss(step):
        tokens, labels, exists, _ = make_batch(run.data, 64, run.device)
        return loss_fn(model(tokens, exists), labels[exists])

    losses = common.train(model, batch_loss, run.steps, lr=2e-3)
    metrics = evaluate(model, run.held_out(), 500, run.device)
    return run.finish("extractive summarization (held-out documents)", losses, metrics)


if __name__ == "__main__":
    main()
