"""Interleaved sampling with a KV cache: the head of each step is the modality of the token the
step produces, decided by a small grammar of begin markers and span lengths.

    grammar = SpanGrammar(begin={boi_id: image}, length={image: 16})
    tokens, modality = generate(model, prompt, prompt_modality, 40, grammar, temperature=0.8)

Text (modality `text`) is sampled until a begin marker (a text token such as begin-of-image);
then exactly `length[m]` tokens of modality m follow, sampled with m's head; then text again (so
an end marker such as end-of-image is predicted by the text head, like any text token).

A continuous modality (`input: continuous`) can be in the prompt, with its feature vectors
(understanding: image -> caption), but has no softmax head to sample its span from: generation
that reaches such a span raises `ValueError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SpanGrammar:
    """begin: text token id -> the modality whose span it opens; length: modality -> span length;
    text: the modality index sampled outside spans."""

    begin: dict[int, int] = field(default_factory=dict)
    length: dict[int, int] = field(default_factory=dict)
    text: int = 0

    def __post_init__(self):
        for token, m in self.begin.items():
            if self.length.get(m, 0) < 1:
                raise ValueError(f"grammar: modality {m} opened by token {token} needs a span "
                                 "length >= 1")

    def start(self, tokens: list[int], modality: list[int]) -> tuple[int, int]:
        """(modality of the next token, tokens left in the current span) after a prompt."""
        m, left = self.text, 0
        for t, mod in zip(tokens, modality):
            if left:
                left -= 1
                m = mod if left else self.text
            elif mod == self.text and t in self.begin:
                m, left = self.begin[t], self.length[self.begin[t]]
        return (m if left else self.text), left

    def step(self, token: int, m: int, left: int) -> tuple[int, int]:
        """State after emitting `token` of modality m with `left` tokens of the span to go."""
        if left:
            left -= 1
            return (m if left else self.text), left
        if m == self.text and token in self.begin:
            nxt = self.begin[token]
            return nxt, self.length[nxt]
        return self.text, 0


def sample(logits: torch.Tensor, temperature: float, top_k: int | None,
           generator: torch.Generator | None) -> int:
    """One id from logits (V,): greedy at temperature 0, else softmax(logits / T) over the top k."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def check_sampleable(model, m: int) -> None:
    """ValueError when the next token would be of a continuous modality."""
    spec = model.cfg.modalities[m]
    if spec.continuous:
        raise ValueError(f"generation would have to sample a span of modality {spec.name!r}, "
                         "whose input is 'continuous': it has no softmax head to sample from; "
                         "give its features in the prompt instead (e.g. image -> caption)")


@torch.no_grad()
def generate(model, tokens: torch.Tensor, modality: torch.Tensor, max_new: int,
             grammar: SpanGrammar, temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None, stop: int | None = None,
             features: torch.Tensor | None = None):
    """Continue one prompt (tokens, modality: (T,) or (1, T); features: (T, F) or (1, T, F), needed
    when the prompt holds a continuous modality) by up to `max_new` tokens, stopping after the
    text token `stop`. Returns (tokens, modality) of prompt + continuation, (1, T')."""
    model.eval()
    tokens, modality = tokens.reshape(1, -1), modality.reshape(1, -1)
    if tokens.shape[1] == 0:
        raise ValueError("generate needs a prompt of at least one token")
    if features is not None:
        features = features.reshape(1, tokens.shape[1], -1)
    m, left = grammar.start(tokens[0].tolist(), modality[0].tolist())
    cache = model.new_cache()
    hidden = model(tokens, modality, cache=cache, features=features)[0, -1]  # (D,)
    out_tokens, out_modality = tokens[0].tolist(), modality[0].tolist()
    for _ in range(max_new):
        check_sampleable(model, m)
        token = sample(model.heads(hidden, m), temperature, top_k, generator)
        out_tokens.append(token)
        out_modality.append(m)
        if stop is not None and m == grammar.text and token == stop:
            break
        if cache.length + 1 > model.cfg.max_seq_len:
            break
        step_in = (torch.tensor([[token]], device=tokens.device),
                   torch.tensor([[m]], device=tokens.device))
        m, left = grammar.step(token, m, left)
        hidden = model(*step_in, cache=cache)[0, -1]
    as_tensor = lambda xs: torch.tensor([xs], device=tokens.device)  # noqa: E731
    return as_tensor(out_tokens), as_tensor(out_modality)
