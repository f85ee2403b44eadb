"""Audio and video in the digits corpus: the log-mel VQ tokenizer, WAV files, spoken digits
(espeak-ng), moving-digit clips, transcription accuracy and WAV generation."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.config import DataConfig
from experiments.data import digits as digits_data
from experiments.data import speech
from mot.tokenizers.audio import (
    AudioConfig,
    AudioTokenizer,
    griffin_lim,
    log_mel,
    mel_filterbank,
    prepare,
    read_wav,
    train_audio_vq,
    write_wav,
)
from tests.conftest import train_and_eval

ROOT = Path(__file__).parent.parent
needs_espeak = pytest.mark.skipif(speech.espeak() is None,
                                  reason="needs espeak-ng (apt-get install espeak-ng)")
AV_MIX = {"caption_image": 0.2, "image_caption": 0.1, "prose": 0.1, "audio_transcript": 0.3,
          "text_audio": 0.1, "video_caption": 0.1, "caption_video": 0.1}


def tone(freq: float, seconds: float, rate: int = 16000) -> torch.Tensor:
    t = torch.arange(int(seconds * rate)) / rate
    return 0.5 * torch.sin(2 * math.pi * freq * t)


def test_mel_filters_are_unit_triangles_in_order():
    cfg = AudioConfig()
    fb = mel_filterbank(cfg)  # (n_mels, bins)
    assert fb.shape == (cfg.n_mels, cfg.n_fft // 2 + 1)
    assert torch.all(fb >= 0) and torch.all(fb.max(1).values <= 1)
    peaks = fb.argmax(1)
    assert torch.all(peaks[1:] >= peaks[:-1])  # centres rise with the mel index
    # a tone lands in the filter whose centre is nearest on the mel axis
    spec = log_mel(prepare(tone(1000.0, 1.0), 16000, cfg), cfg)  # (frames, mels)
    assert spec.shape == (cfg.frames, cfg.n_mels)
    bins = torch.linspace(0, cfg.sample_rate / 2, cfg.n_fft // 2 + 1)
    assert abs(float(bins[peaks[spec[10].argmax()]]) - 1000.0) < 200


def test_prepare_trims_leading_silence_and_fixes_the_length():
    cfg = AudioConfig()
    wave = torch.cat([torch.zeros(4000), tone(440.0, 0.3)])
    out = prepare(wave, 16000, cfg)
    assert out.shape == (cfg.samples,)
    start = 4001  # the tone's first sample is sin(0) = 0, below 2 % of the peak
    torch.testing.assert_close(out[:100], wave[start:start + 100])
    assert torch.all(out[len(wave) - start:] == 0) and out[len(wave) - start - 1] != 0
    # another rate is resampled: 0.3 s at 8 kHz is still 0.3 s of signal
    slow = prepare(tone(440.0, 0.3, 8000), 8000, cfg)
    assert int((slow != 0).nonzero().max()) == pytest.approx(0.3 * 16000, abs=3)


def test_wav_round_trip_and_errors(tmp_path):
    wave = tone(300.0, 0.2)
    write_wav(tmp_path / "a.wav", wave, 16000)
    back, rate = read_wav(tmp_path / "a.wav")
    assert rate == 16000
    torch.testing.assert_close(back, (wave * 32767).round() / 32768, atol=1e-6, rtol=0)
    (tmp_path / "bad.wav").write_bytes(b"RIFF1234WAVEjunk")
    with pytest.raises(ValueError, match="bad.wav: not a readable WAV file"):
        read_wav(tmp_path / "bad.wav")
    write_wav(tmp_path / "empty.wav", torch.zeros(0), 16000)
    with pytest.raises(ValueError, match="empty.wav: empty"):
        read_wav(tmp_path / "empty.wav")


def test_griffin_lim_recovers_a_tone_spectrogram():
    cfg = AudioConfig()
    spec = log_mel(prepare(tone(800.0, 1.0), 16000, cfg), cfg)
    wave = griffin_lim(spec, cfg)
    again = log_mel(wave, cfg)
    # the strongest band of each frame is the same one (phase recovery keeps the pitch)
    assert torch.equal(again[2:-2].argmax(1), spec[2:-2].argmax(1))


def test_moving_clip_slides_the_digit():
    image = torch.arange(64, dtype=torch.float32).view(8, 8) / 4
    right = digits_data.moving_clip(image, "right")
    left = digits_data.moving_clip(image, "left")
    assert right.shape == (digits_data.VIDEO_FRAMES, 8, digits_data.VIDEO_WIDTH)
    for f in range(digits_data.VIDEO_FRAMES):
        x = f * digits_data.VIDEO_STEP
        assert torch.equal(right[f, :, x:x + 8], image) and right[f].sum() == image.sum()
    assert torch.equal(left, right.flip(0))


@needs_espeak
def test_audio_vq_reconstructs_held_out_spoken_digits():
    cfg = AudioConfig()
    spoken = speech.spoken_digits(tuple(digits_data.WORDS))
    clips = [(label, w, r) for label, w, r, speaker in spoken
             if speaker.endswith("/55")]  # one pitch: 180 clips
    specs = torch.stack([log_mel(prepare(w, r, cfg), cfg) for _, w, r in clips])
    order = torch.randperm(len(clips), generator=torch.Generator().manual_seed(0))
    train, held = order[:150], order[150:]
    tok = AudioTokenizer(train_audio_vq(specs[train], cfg, steps=200))
    codes = tok.encode_spectrograms(specs[held])
    assert codes.shape == (len(held), cfg.codes_per_clip)
    with torch.no_grad():
        rec = tok.model.decode(codes)
    relative = float(((rec - specs[held]) ** 2).mean() / specs[held].var())
    assert relative < 0.15  # measured about 0.05
    assert tok.encode(clips[0][1], clips[0][2]) == tok.encode_spectrograms(specs[:1])[0].tolist()


def _av_config(tmp_path, **extra):
    return DataConfig(name="digits", num_tokens=20000, vq_steps=100, audio_vq_steps=100,
                      cache_dir=str(tmp_path / "cache"), mix=AV_MIX, **extra)


@needs_espeak
def test_digits_corpus_with_audio_and_video(tmp_path):
    from experiments.data import build_stream

    cfg = _av_config(tmp_path)
    stream = build_stream(cfg)
    assert stream.modalities == ["text", "image", "audio", "video"]
    assert stream.spans == {"boi": ("image", 16), "boa": ("audio", 10), "bov": ("video", 72)}
    sp, tokens, modality = stream.specials, stream.tokens, stream.modality
    for marker, end, name in (("boa", "eoa", "audio"), ("bov", "eov", "video")):
        m, length = stream.modalities.index(name), stream.spans[marker][1]
        starts = ((tokens == sp[marker]) & (modality == 0)).nonzero().flatten()
        assert len(starts) > 5
        for s in starts.tolist():
            assert torch.all(modality[s + 1:s + 1 + length] == m)
            assert tokens[s + 1 + length] == sp[end] and modality[s + 1 + length] == 0
        assert int((modality == m).sum()) == len(starts) * length
    clips = stream.meta["clips"]
    assert not set(clips["train"]) & set(clips["val"])
    assert len(clips["train"]) + len(clips["val"]) == 540
    # a transcript follows each spoken clip and names the clip's digit
    text_tok, _ = digits_data.load_tokenizers(cfg)
    audio_tok = digits_data.load_audio_tokenizer(cfg)
    codes = torch.load(digits_data.cache_folder(cfg) / "audio_codes.pt", weights_only=True)
    s = int(((tokens == sp["boa"]) & (modality == 0)).nonzero()[0])
    clip = [c for c in range(len(codes)) if torch.equal(codes[c], tokens[s + 1:s + 11])][0]
    after = tokens[s + 12:].tolist()
    words = text_tok.decode(after[:after.index(sp["eos"])] if sp["eos"] in after else after)
    label = stream.meta["clip_labels"][clip]
    if stream.tokens[s - 1] == sp["bos"]:  # audio_transcript: "<bos> <boa> .. <eoa> transcript"
        assert digits_data.WORDS[label] in words
    assert audio_tok.vocab_size == stream.vocab["audio"]


def test_audio_is_skipped_with_a_notice_without_espeak(tmp_path, monkeypatch, capsys):
    from experiments.data import build_stream

    monkeypatch.setattr(speech, "espeak", lambda: None)
    stream = build_stream(_av_config(tmp_path))
    assert stream.modalities == ["text", "image", "video"]
    assert "audio documents skipped: espeak-ng is not installed (apt-get install espeak-ng)" \
        in capsys.readouterr().out
    assert "boa" not in stream.spans and "bov" in stream.spans


@needs_espeak
def test_transcription_accuracy_and_wav_generation_on_a_run(tmp_path):
    out = tmp_path / "run"
    mix = json.dumps(AV_MIX).replace('"', "")
    args = ["--config", "experiments/configs/digits.yaml", "train.steps=10", "model.dim=32",
            "model.n_layers=1", "data.num_tokens=20000", "data.vq_steps=100",
            "data.audio_vq_steps=100", f"data.mix={mix}",
            "model.modalities=[{name: text, vocab_size: 512}, {name: image, vocab_size: 128}, "
            "{name: audio, vocab_size: 128}, {name: video, vocab_size: 128}]",
            f"data.cache_dir={tmp_path / 'cache'}", "train.seq_len=128"]
    report = train_and_eval(out, args)
    assert 0.0 <= report["transcription_accuracy"] <= 1.0
    assert set(report["validation"]) == {"text", "image", "audio", "video"}
    spoken = subprocess.run([sys.executable, "-m", "experiments.generate", str(out), "--prompt",
                             "say seven", "--then", "audio", "--max-new", "12", "--out",
                             str(tmp_path / "wav")], cwd=ROOT, capture_output=True, text=True)
    assert spoken.returncode == 0, spoken.stderr[-2000:]
    assert spoken.stdout.startswith("<bos>say seven<boa>[audio 1]")
    wave, rate = read_wav(tmp_path / "wav" / "audio_1.wav")
    assert rate == 16000 and wave.numel() == AudioConfig().samples and wave.abs().max() > 0.5
    moving = subprocess.run([sys.executable, "-m", "experiments.generate", str(out), "--prompt",
                             "a seven moving left", "--then", "video", "--max-new", "74", "--out",
                             str(tmp_path / "video")], cwd=ROOT, capture_output=True, text=True)
    assert moving.returncode == 0, moving.stderr[-2000:]
    png = (tmp_path / "video" / "video_1.png").read_bytes()
    assert png[:4] == b"\x89PNG"
    width, height = np.frombuffer(png[16:24], dtype=">u4").tolist()
    assert width * 8 == height * 3 * 12  # three 8 x 12 frames side by side
