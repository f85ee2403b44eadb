"""`python -m experiments.ingest`: small generated image, text and WAV folders (bad files among
them) -> the packed format, read back with `TokenStream.load` and checked document by document."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import mot.tokenizers
import mot.tokenizers.audio
from experiments.data import TokenStream
from experiments.ingest import BadInput, IngestConfig, ingest, main, paragraphs, read_image
from mot.tokenizers import BPETokenizer, VQTokenizer
from mot.tokenizers.audio import AudioTokenizer, read_wav, write_wav

FAST = dict(vq_steps=3, audio_vq_steps=3, val_fraction=0.25)
CAPTIONS = {f"img{i}.png": f"a picture of pattern {i}" for i in range(5)}
CAPTIONS["sub/img5.png"] = "naïve café ☕, in a subfolder"
TEXTS = {"a.txt": "first paragraph\nwith two lines\n\n\nsecond one\n",
         "b.txt": "a lone paragraph of prose"}
PARAGRAPHS = ["first paragraph\nwith two lines", "second one", "a lone paragraph of prose"]
TRANSCRIPTS = {f"clip{i}.wav": f"a tone of {200 + 100 * i} hertz" for i in range(4)}
SECONDS = {"clip0.wav": 0.5, "clip1.wav": 0.5, "clip2.wav": 0.5, "clip3.wav": 1.0}


def write_image(path, seed: int, size=(10, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_tone(path, hertz: float, seconds: float, rate: int = 16000):
    t = torch.arange(int(seconds * rate)) / rate
    write_wav(path, 0.5 * torch.sin(2 * torch.pi * hertz * t), rate)


def write_jsonl(path, records: dict, key: str):
    path.write_text("".join(json.dumps({"file": f, key: t}) + "\n" for f, t in records.items()))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """images/ (captions.jsonl inside it), text/, audio/ + transcripts.jsonl."""
    root = tmp_path_factory.mktemp("sources")
    for i, name in enumerate(CAPTIONS):
        write_image(root / "images" / name, seed=i)
    write_jsonl(root / "images" / "captions.jsonl", CAPTIONS, "caption")
    (root / "images" / ".DS_Store").write_bytes(b"hidden files are not inputs")
    (root / "text").mkdir()
    for name, text in TEXTS.items():
        (root / "text" / name).write_text(text)
    for i, name in enumerate(TRANSCRIPTS):
        write_tone(root / "audio" / name, 200 + 100 * i, SECONDS[name])
    write_jsonl(root / "transcripts.jsonl", TRANSCRIPTS, "text")
    return {"images": str(root / "images"), "captions": str(root / "images" / "captions.jsonl"),
            "text": [str(root / "text")], "audio": str(root / "audio"),
            "transcripts": str(root / "transcripts.jsonl")}


@pytest.fixture(scope="module")
def corpus(sources, tmp_path_factory):
    """An ingested corpus with trained tokenizers, and what each tokenizer was trained on."""
    seen = {}
    bpe_train, vq_train = BPETokenizer.train, mot.tokenizers.train_vqvae
    audio_train = mot.tokenizers.audio.train_audio_vq

    def record(kind, fn):
        def wrapped(data, *args, **kwargs):
            seen[kind] = list(data) if kind == "text" else data.clone()
            return fn(seen[kind], *args, **kwargs)
        return wrapped

    out = tmp_path_factory.mktemp("corpus") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BPETokenizer, "train", classmethod(
            lambda cls, texts, *a, **k: record("text", bpe_train)(texts, *a, **k)))
        mp.setattr(mot.tokenizers, "train_vqvae", record("image", vq_train))
        mp.setattr(mot.tokenizers.audio, "train_audio_vq", record("audio", audio_train))
        stream = ingest(IngestConfig(str(out), train_tokenizers=True, **sources, **FAST))
    return out, stream, seen


def documents(stream):
    """[(tokens, modality)] per document id, as lists."""
    bounds = torch.nonzero(stream.doc[1:] != stream.doc[:-1]).flatten() + 1
    cuts = [0] + bounds.tolist() + [len(stream.doc)]
    return [(stream.tokens[a:b].tolist(), stream.modality[a:b].tolist())
            for a, b in zip(cuts[:-1], cuts[1:])]


def parse(doc, sp, text_tok):
    """A document -> (kind, its text decoded, its span codes); checks the layout on the way."""
    tokens, modality = doc
    assert tokens[0] == sp["bos"] and tokens[-1] == sp["eos"]
    if sp["boi"] in tokens:
        b = tokens.index(sp["boi"])
        codes = tokens[b + 1:b + 17]
        assert modality[b + 1:b + 17] == [1] * 16 and tokens[b + 17] == sp["eoi"]
        assert tokens[b + 18:] == [sp["eos"]] and set(modality[:b + 1]) == {0}
        return "image", text_tok.decode(tokens[1:b]), codes
    if tokens[1] == sp["boa"]:
        codes = tokens[2:12]
        assert modality[2:12] == [2] * 10 and tokens[12] == sp["eoa"]
        assert set(modality[:2] + modality[12:]) == {0}
        return "audio", text_tok.decode(tokens[13:-1]), codes
    assert set(modality) == {0}
    return "text", text_tok.decode(tokens[1:-1]), []


def test_documents_read_back_exactly(corpus, sources):
    out, stream, _ = corpus
    loaded = TokenStream.load(out)
    for name in ("tokens", "modality", "doc"):
        assert torch.equal(getattr(loaded, name), getattr(stream, name))
    assert loaded.modalities == ["text", "image", "audio"]
    assert loaded.spans == {"boi": ("image", 16), "boa": ("audio", 10)}
    text_tok = BPETokenizer.load(out / "text.json")
    vq, audio = VQTokenizer.load(out / "vq.pt"), AudioTokenizer.load(out / "audio.pt")
    assert loaded.vocab == {"text": text_tok.vocab_size, "image": 128, "audio": 128}
    assert loaded.specials == text_tok.specials
    parsed = [parse(d, loaded.specials, text_tok) for d in documents(loaded)]
    assert len(parsed) == len(CAPTIONS) + len(PARAGRAPHS) + len(TRANSCRIPTS)
    by_text = {text: (kind, codes) for kind, text, codes in parsed}
    assert sorted(by_text) == sorted([*CAPTIONS.values(), *PARAGRAPHS, *TRANSCRIPTS.values()])
    # span codes are what the saved tokenizers give for the files they belong to
    for name, caption in CAPTIONS.items():
        image = read_image(f"{sources['images']}/{name}", 8)
        assert by_text[caption] == ("image", vq.encode(image))
    for name, transcript in TRANSCRIPTS.items():
        wave, rate = read_wav(f"{sources['audio']}/{name}")
        assert by_text[transcript] == ("audio", audio.encode(wave, rate))
    assert loaded.meta["skipped"] == []
    assert loaded.meta["cut_clips"] == {"clip3.wav": 1.0}  # 1 s of tone, minus 1 silent sample


def test_split_is_by_item_and_tokenizers_see_only_train(corpus, sources):
    out, stream, seen = corpus
    split = stream.meta["split"]
    names = {"image": sorted(CAPTIONS), "audio": sorted(TRANSCRIPTS),
             "text": sorted(f"{sources['text'][0]}/{f}#{i}"
                            for f, n in (("a.txt", 2), ("b.txt", 1)) for i in range(1, n + 1))}
    for kind, everything in names.items():
        train, val = set(split["train"][kind]), set(split["val"][kind])
        assert not train & val and sorted(train | val) == everything
        assert len(val) == max(1, int(len(everything) * 0.25))
    # every document lies on its item's side of split_at, which is a document boundary
    cut = stream.split_at
    assert 0 < cut < len(stream.tokens) and stream.doc[cut] != stream.doc[cut - 1]
    text_tok = BPETokenizer.load(out / "text.json")
    paragraph_of = dict(zip(names["text"], PARAGRAPHS))
    item_of = {**{c: f for f, c in CAPTIONS.items()}, **{t: f for f, t in TRANSCRIPTS.items()},
               **{p: n for n, p in paragraph_of.items()}}
    start = 0
    for tokens, modality in documents(stream):
        kind, text, _ = parse((tokens, modality), stream.specials, text_tok)
        side = "train" if start < cut else "val"
        assert item_of[text] in split[side][kind], (text, side)
        start += len(tokens)
    assert stream.meta["documents"] == {"train": int(stream.doc[cut - 1]) + 1,
                                        "val": int(stream.doc[-1] - stream.doc[cut - 1])}
    # tokenizers were trained on the train items and nothing else
    train_texts = [CAPTIONS[f] for f in split["train"]["image"]] \
        + [paragraph_of[n] for n in split["train"]["text"]] \
        + [TRANSCRIPTS[f] for f in split["train"]["audio"]]
    assert sorted(seen["text"]) == sorted(train_texts)
    train_images = torch.stack([read_image(f"{sources['images']}/{f}", 8)
                                for f in split["train"]["image"]])
    assert sorted(map(tuple, seen["image"].flatten(1).tolist())) == \
        sorted(map(tuple, train_images.flatten(1).tolist()))
    audio = AudioTokenizer.load(out / "audio.pt")
    train_specs = torch.stack([audio.spectrogram(*read_wav(f"{sources['audio']}/{f}"))
                               for f in split["train"]["audio"]])
    assert sorted(map(tuple, seen["audio"].flatten(1).tolist())) == \
        sorted(map(tuple, train_specs.flatten(1).tolist()))


def test_deterministic_and_tokenizers_reusable(corpus, sources, tmp_path):
    out, stream, _ = corpus
    again = ingest(IngestConfig(str(tmp_path / "again"), train_tokenizers=True, **sources,
                                **FAST))
    reused = ingest(IngestConfig(str(tmp_path / "reused"), tokenizers=str(out), **sources,
                                 **FAST))
    for other in (again, reused):
        for name in ("tokens", "modality", "doc"):
            assert torch.equal(getattr(other, name), getattr(stream, name)), name
        assert other.split_at == stream.split_at and other.meta["split"] == stream.meta["split"]
    assert sorted(p.name for p in (tmp_path / "reused").iterdir()) == \
        sorted(p.name for p in out.iterdir())
    # the seed matters: another one splits differently
    seed1 = ingest(IngestConfig(str(tmp_path / "seed1"), tokenizers=str(out), **sources,
                                **{**FAST, "seed": 1}))
    assert seed1.meta["split"] != stream.meta["split"]


@pytest.fixture
def bad_sources(tmp_path):
    """3 good images + a corrupt PNG (captioned) + an uncaptioned one; a good text file + an
    empty one; 2 good 16 kHz clips + an 8 kHz one (transcribed)."""
    images, audio, text = tmp_path / "images", tmp_path / "audio", tmp_path / "text"
    captions = {f"img{i}.png": f"good image {i}" for i in range(3)}
    for i, name in enumerate(captions):
        write_image(images / name, seed=i)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    write_image(images / "orphan.png", seed=9)
    write_jsonl(tmp_path / "captions.jsonl", {**captions, "corrupt.png": "broken"}, "caption")
    with open(tmp_path / "captions.jsonl", "a") as f:  # a second caption: a second document
        f.write(json.dumps({"file": "img0.png", "caption": "good image 0, again"}) + "\n")
    text.mkdir()
    (text / "good.txt").write_text("one good paragraph")
    (text / "empty.txt").write_text("\n  \n")
    transcripts = {"c0.wav": "tone zero", "c1.wav": "tone one", "low.wav": "too slow"}
    write_tone(audio / "c0.wav", 300, 0.5)
    write_tone(audio / "c1.wav", 600, 0.5)
    write_tone(audio / "low.wav", 300, 0.5, rate=8000)
    write_jsonl(tmp_path / "transcripts.jsonl", transcripts, "text")
    bad = {f"{images}/corrupt.png": "not a readable image",
           f"{images}/orphan.png": f"no caption in {tmp_path}/captions.jsonl",
           f"{text}/empty.txt": "empty (no paragraphs)",
           f"{audio}/low.wav": "sample rate 8000 Hz, expected 16000 Hz (--sample-rate)"}
    argv = ["--images", str(images), "--captions", str(tmp_path / "captions.jsonl"),
            "--text", str(text), "--audio", str(audio),
            "--transcripts", str(tmp_path / "transcripts.jsonl")]
    return argv, bad


def test_bad_inputs_are_all_reported_and_nothing_written(bad_sources, corpus, tmp_path,
                                                         capsys):
    argv, bad = bad_sources
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    assert main([str(out), "--tokenizers", str(corpus[0]), *argv]) == 2
    err = capsys.readouterr().err.splitlines()
    for path, reason in bad.items():
        assert any(line.startswith(f"{path}: ") and reason in line for line in err), path
    # inputs: 5 image files + 5 caption lines + 1 paragraph + 1 empty file + 3 WAV files
    # + 3 transcript lines
    assert err[-1].startswith("4 bad of 18 inputs; nothing written")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no OUT_DIR, no temp folder

    assert main([str(out), "--tokenizers", str(corpus[0]), "--skip-bad", *argv]) == 0
    stream = TokenStream.load(out)
    assert {s["input"] for s in stream.meta["skipped"]} == set(bad)
    docs = documents(stream)
    assert len(docs) == 4 + 1 + 2
    text_tok = BPETokenizer.load(out / "text.json")
    start, side = 0, {}
    for doc in docs:
        side[parse(doc, stream.specials, text_tok)[1]] = start < stream.split_at
        start += len(doc[0])
    assert side["good image 0"] == side["good image 0, again"]  # one item, one side
    kept = {k: sorted(stream.meta["split"]["train"][k] + stream.meta["split"]["val"][k])
            for k in ("image", "text", "audio")}
    assert kept == {"image": ["img0.png", "img1.png", "img2.png"],
                    "text": [f"{tmp_path}/text/good.txt#1"], "audio": ["c0.wav", "c1.wav"]}


def test_every_kind_of_bad_input_named(tmp_path):
    images, text, audio = tmp_path / "images", tmp_path / "text", tmp_path / "audio"
    write_image(images / "a.png", seed=0)
    write_image(images / "b.png", seed=1)
    (tmp_path / "captions.jsonl").write_text(
        '{"file": "a.png", "caption": "fine"}\n\n{"file": "b.png", "caption": ""}\n'
        '{"file": "gone.png", "caption": "no such file"}\nnot json\n["a list"]\n')
    text.mkdir()
    (text / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (text / "marker.txt").write_text("fine\n\nthe end <eos> of it")
    (tmp_path / "no_text").mkdir()
    audio.mkdir()
    (audio / "junk.wav").write_bytes(b"RIFF....WAVE")
    write_tone(audio / "ok.wav", 300, 0.5)
    (tmp_path / "transcripts.jsonl").write_text('{"file": "ok.wav", "text": " "}\n')
    with pytest.raises(BadInput) as e:
        ingest(IngestConfig(str(tmp_path / "out"), images=str(images),
                            captions=str(tmp_path / "captions.jsonl"),
                            text=[str(text), str(tmp_path / "no_text")],
                            audio=str(audio), transcripts=str(tmp_path / "transcripts.jsonl"),
                            train_tokenizers=True))
    caps, trs = tmp_path / "captions.jsonl", tmp_path / "transcripts.jsonl"
    expected = [
        (f"{caps}:3", "caption of 'b.png': empty"),
        (f"{caps}:5", "not JSON (Expecting value)"),
        (f"{caps}:6", 'must be an object with string fields "file" and "caption"'),
        (f"{images}/b.png", f"no caption in {caps}"),
        (f"{caps}:4", f"'gone.png' is not a file in {images}"),
        (f"{tmp_path}/no_text", "no text files"),
        (f"{text}/latin1.txt", "not UTF-8 text (byte 3)"),
        (f"{text}/marker.txt#2", "contains <eos>, a marker of the token stream"),
        (f"{trs}:1", "transcript of 'ok.wav': empty"),
        (f"{audio}/junk.wav", f"no transcript in {trs}; not a readable WAV file"),
        (f"{audio}/ok.wav", f"no transcript in {trs}"),
    ]
    assert len(e.value.problems) == len(expected)
    for (path, reason), (want_path, want_reason) in zip(e.value.problems, expected):
        assert path == want_path and reason.startswith(want_reason), (path, reason)
    # inputs: 2 images + 5 caption lines + an empty folder + 2 text files (one unreadable, one of
    # 2 paragraphs) + 2 WAVs + 1 transcript line
    assert e.value.inputs == 2 + 5 + 1 + 1 + 2 + 2 + 1
    assert not (tmp_path / "out").exists()


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text("one\n\ntwo\n\nthree")
    cfg = dict(text=[str(tmp_path / "t.txt")], train_tokenizers=True, val_fraction=0.3)
    ingest(IngestConfig(str(tmp_path / "old"), **cfg))
    old = (tmp_path / "old" / "tokens.npy").read_bytes()
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        IngestConfig(str(tmp_path / "old"), **cfg)

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", disk_full)
    for name, overwrite in (("new", False), ("old", True)):
        with pytest.raises(OSError, match="disk full"):
            ingest(IngestConfig(str(tmp_path / name), overwrite=overwrite, **cfg))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "t.txt"]
    assert (tmp_path / "old" / "tokens.npy").read_bytes() == old
    monkeypatch.undo()
    stream = ingest(IngestConfig(str(tmp_path / "old"), overwrite=True, **{**cfg, "seed": 3}))
    assert torch.equal(TokenStream.load(tmp_path / "old").tokens, stream.tokens)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "t.txt"]


@pytest.mark.parametrize("change, message", [
    (dict(images=None, captions=None, text=[], audio=None, transcripts=None),
     "no input: give --images DIR --captions FILE"),
    (dict(tokenizers="TOK"), "exactly one of --tokenizers DIR .* and --train-tokenizers"),
    (dict(train_tokenizers=False), "exactly one of --tokenizers DIR .* and --train-tokenizers"),
    (dict(image_size=7), r"--image-size \(7\) must be even"),
    (dict(image_size=0), r"--image-size \(0\) must be a positive integer"),
    (dict(captions=None), "--images/--captions must be given together"),
    (dict(val_fraction=0.5), r"--val-fraction \(0.5\) must be in \(0, 0.5\)"),
    (dict(text_vocab=100), r"--text-vocab \(100\) must be >= 263"),
    (dict(clip_seconds=0.5), r"--clip-seconds \(0.5\) must be a positive multiple of 0.08 s"),
    (dict(text=["missing.txt"]), r"--text \(missing.txt\) does not exist"),
])
def test_clear_errors(sources, change, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = {**sources, "train_tokenizers": True, **change}
    with pytest.raises(ValueError, match=message):
        IngestConfig(str(tmp_path / "out"), **cfg)


def test_tokenizers_folder_must_hold_what_is_needed(sources, tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    BPETokenizer.train(["some text"], 300).save(tmp_path / "tok" / "text.json")
    with pytest.raises(ValueError, match=f"--tokenizers \\({tmp_path}/tok\\) has no vq.pt, "
                                         "the image tokenizer"):
        IngestConfig(str(tmp_path / "out"), tokenizers=str(tmp_path / "tok"), **sources)
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "out"), "--train-tokenizers"])
    assert e.value.code == 2 and "no input: give --images" in capsys.readouterr().err


def test_read_image_and_paragraphs_by_hand(tmp_path):
    for colour, value in ((255, 16.0), (0, 0.0), (51, 3.2)):
        Image.new("L", (3, 5), colour).save(tmp_path / "x.png")
        assert torch.allclose(read_image(tmp_path / "x.png", 8), torch.full((8, 8), value))
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "red.png")  # L = 0.299 R -> 76
    assert torch.allclose(read_image(tmp_path / "red.png", 2), torch.full((2, 2), 76 / 255 * 16))
    assert paragraphs("a\nb\n\n\n  \nc\r\n\r\nd \n") == ["a\nb", "c", "d"]
    assert paragraphs(" \n\t\n") == []


def test_an_ingested_corpus_trains_as_data_packed(corpus, tmp_path):
    from experiments.config import load_config
    from experiments.data import build_stream
    from experiments.run import load_run
    from experiments.train import DEFAULT_CONFIG, train

    out, stream, _ = corpus
    loaded = build_stream(load_config(DEFAULT_CONFIG, ["data.name=packed",
                                                       f"data.path={out}"]).data)
    assert loaded.tokens.dtype == torch.int32 and loaded.modality.dtype == torch.uint8  # mapped
    window = loaded.window(0, 8)
    assert all(t.dtype == torch.int64 for t in window[:3])
    assert torch.equal(window[0], stream.tokens[:8].long())
    # the model may list modalities the data lacks (and in another order): ids follow names
    modalities = ("[{name: text, vocab_size: 600}, {name: video, vocab_size: 8}, "
                  "{name: audio, vocab_size: 128}, {name: image, vocab_size: 128}]")
    cfg = load_config(DEFAULT_CONFIG, ["data.name=packed", f"data.path={out}",
                                       f"model.modalities={modalities}", "model.dim=32",
                                       "model.n_layers=1", "train.steps=2", "train.seq_len=16",
                                       "train.batch_size=2", f"train.out_dir={tmp_path / 'run'}"])
    aligned = loaded.aligned_to(cfg.model)
    names = cfg.model.modality_names
    for data_id, name in enumerate(loaded.modalities):
        assert torch.equal(aligned.modality == names.index(name), loaded.modality == data_id)
    summary = train(cfg, progress=False)
    assert summary["steps"] == 2 and math.isfinite(summary["final_train_loss"])
    run_cfg, _, run_stream, step = load_run(tmp_path / "run")
    assert step == 2 and run_stream.modalities == names
    missing = load_config(DEFAULT_CONFIG, ["model.modalities=[{name: text, vocab_size: 600}]",
                                           "model.attention.bidirectional_modalities=[]"])
    with pytest.raises(ValueError, match=r"lack the data's modalities \['image', 'audio'\]"):
        loaded.aligned_to(missing.model)
    with pytest.raises(ValueError, match="data.path must name a packed corpus folder"):
        build_stream(load_config(DEFAULT_CONFIG, ["data.name=packed"]).data)
