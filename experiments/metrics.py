"""Task metrics of the digits corpus, written against small callables so that each can be
checked on hand-built cases:

- captioning accuracy: given an image, is the digit whose captions the model finds most likely
  (summed over the caption templates) the image's label?
- generation accuracy: given a caption of digit d, does the image the model generates, decoded
  by the VQ decoder, get classified as d by a classifier trained on real digits?
- transcription accuracy: given a spoken digit (audio codes), is the digit whose transcripts the
  model finds most likely the spoken one? (`caption_accuracy` with the audio span markers)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


@torch.no_grad()
def continuation_logprobs(model, prefix: list[tuple[int, int]],
                          continuations: list[list[tuple[int, int]]],
                          prefix_features: torch.Tensor | None = None) -> torch.Tensor:
    """log P(continuation | prefix) of each continuation, as one padded batch.
    Items are (token, modality) pairs; returns (len(continuations),). prefix_features
    (len(prefix), F): the continuous inputs of the prefix, for models with continuous
    modalities (continuations are discrete)."""
    rows = [prefix + c for c in continuations]
    T = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    modality = torch.zeros(len(rows), T, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor([t for t, _ in row])
        modality[i, :len(row)] = torch.tensor([m for _, m in row])
    features = None
    if prefix_features is not None:
        features = prefix_features.new_zeros(len(rows), T, prefix_features.shape[1])
        features[:, :len(prefix)] = prefix_features
        features = features[:, :-1]
    hidden = model(tokens[:, :-1], modality[:, :-1], features=features)  # (C, T-1, D)
    out = torch.zeros(len(rows))
    for i, row in enumerate(rows):
        for pos in range(len(prefix), len(row)):
            token, m = row[pos]
            logits = model.heads(hidden[i, pos - 1], m).float()
            out[i] += logits.log_softmax(-1)[token]
    return out


def caption_accuracy(score: Callable[[list, list], torch.Tensor], images: Sequence[list[int]],
                     labels: Sequence[int], captions: Callable[[int], list[list[int]]],
                     specials: dict[str, int], eos: bool = True,
                     span: tuple[str, str, int] = ("boi", "eoi", 1),
                     span_features: Sequence[torch.Tensor] | None = None) -> float:
    """score(prefix, continuations) -> log-probs; images: code ids per image (or per clip);
    captions(d): the token ids of every caption of digit d. A digit's score is the log-sum-exp
    over its captions (each followed by <eos>). span: the (begin, end) special names and the
    modality id of the codes (audio: ("boa", "eoa", audio id)). span_features: per image, the
    continuous features (len(codes), F) of its positions, for a model that reads them; score is
    then called as score(prefix, continuations, prefix_features)."""
    begin, end, m = span
    correct = 0
    for i, (codes, label) in enumerate(zip(images, labels)):
        prefix = [(specials["bos"], 0), (specials[begin], 0)] + [(c, m) for c in codes] \
            + [(specials[end], 0)]
        extra = ()
        if span_features is not None:
            f = span_features[i]
            rows = f.new_zeros(len(prefix), f.shape[1])
            rows[2:2 + len(codes)] = f
            extra = (rows,)
        per_digit = []
        for d in range(10):
            cands = [[(t, 0) for t in cap] + ([(specials["eos"], 0)] if eos else [])
                     for cap in captions(d)]
            per_digit.append(score(prefix, cands, *extra).logsumexp(0))
        correct += int(torch.stack(per_digit).argmax()) == label
    return correct / max(len(labels), 1)


def generation_accuracy(generate_image: Callable[[int, int], torch.Tensor],
                        classify: Callable[[torch.Tensor], torch.Tensor],
                        samples_per_digit: int) -> float:
    """generate_image(d, i) -> image (H, W) for the i-th caption sample of digit d;
    classify(images (N, H, W)) -> predicted digits (N,)."""
    images, wanted = [], []
    for d in range(10):
        for i in range(samples_per_digit):
            images.append(generate_image(d, i))
            wanted.append(d)
    predicted = classify(torch.stack(images))
    return float((predicted == torch.tensor(wanted)).float().mean())


def digit_classifier(train_images: torch.Tensor, train_labels: Sequence[int]):
    """Logistic regression on raw pixels of real digits: images (N, H, W) -> digits (N,)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000)
    clf.fit(train_images.reshape(len(train_images), -1).numpy(), list(train_labels))
    return lambda images: torch.as_tensor(clf.predict(images.reshape(len(images), -1).numpy()))
