"""Build random-weight model directories that FunASR's AutoModel loads like the real ones.

Used where no model hub can be reached. The architectures, file names and loading paths
are the published ones, so loading, batching and timing are real; the text and the
embeddings are meaningless. `tiny` is for tests, `full` costs what the real model costs.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SENSEVOICE_VOCAB_SIZE = 25055
# SenseVoice's tag tokens at their published ids; the model's own lid/textnorm tables use them.
SENSEVOICE_SPECIAL_TOKENS = {
    24884: "<|zh|>", 24885: "<|en|>", 24888: "<|yue|>", 24892: "<|ja|>", 24896: "<|ko|>",
    24992: "<|nospeech|>", 24993: "<|Speech|>", 25001: "<|HAPPY|>", 25002: "<|SAD|>",
    25003: "<|ANGRY|>", 25004: "<|NEUTRAL|>", 25009: "<|EMO_UNKNOWN|>",
    25016: "<|withitn|>", 25017: "<|woitn|>",
}  # fmt: skip

SENSEVOICE_ENCODER = {
    "full": {"output_size": 512, "attention_heads": 4, "linear_units": 2048, "num_blocks": 50, "tp_blocks": 20},
    "tiny": {"output_size": 64, "attention_heads": 4, "linear_units": 128, "num_blocks": 2, "tp_blocks": 1},
}
ERES2NETV2_CONF = {
    "full": {"m_channels": 64, "num_blocks": [3, 4, 6, 3]},
    "tiny": {"m_channels": 8, "num_blocks": [1, 1, 1, 1]},
}
CAMPPLUS_CONF = {
    "full": {"growth_rate": 32, "bn_size": 4, "init_channels": 128},
    "tiny": {"growth_rate": 8, "bn_size": 2, "init_channels": 32},
}
SEED = 20260101  # fixed so every host builds the same weights

_WORDS = (
    "hello world the quick brown fox jumps over a lazy dog voice device speech model ray serve "
    "session utterance speaker listen stop start weather today tomorrow light kitchen music play "
    "turn on off please thank you what time is it open close door window morning evening"
).split()


@contextmanager
def _build_lock(target: Path):
    """Serialise builds of one directory across processes (several replicas may start at once)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_built(target: Path, builder: Callable[[Path], None], marker: str = "configuration.json") -> Path:
    """Build `target` once with `builder(tmpdir)`; later calls return at once."""
    if (target / marker).exists():
        return target
    with _build_lock(target):
        if (target / marker).exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; other users on the host load it too
        try:
            builder(tmp)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _write_cmvn(path: Path, dim: int) -> None:
    """Kaldi Nnet text with <AddShift>/<Rescale>, as funasr's load_cmvn reads it."""
    shift = " ".join(["-12.0"] * dim)
    scale = " ".join(["0.25"] * dim)
    path.write_text(
        f"<Nnet>\n<Splice> {dim} {dim}\n[ 0 ]\n"
        f"<AddShift> {dim} {dim}\n<LearnRateCoef> 0 [ {shift} ]\n"
        f"<Rescale> {dim} {dim}\n<LearnRateCoef> 0 [ {scale} ]\n</Nnet>\n"
    )


def _write_tokenizer(path: Path) -> None:
    """A small BPE padded to SenseVoice's vocab with its tag tokens at their real ids."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    rng = np.random.default_rng(SEED)
    sentences = [" ".join(rng.choice(_WORDS, size=8)) for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=200, model_type="bpe",
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    seen = {p.piece for p in proto.pieces}
    filler = 0
    while len(proto.pieces) < SENSEVOICE_VOCAB_SIZE:
        idx = len(proto.pieces)
        piece = proto.pieces.add()
        if idx in SENSEVOICE_SPECIAL_TOKENS:
            piece.piece, piece.type, piece.score = (
                SENSEVOICE_SPECIAL_TOKENS[idx],
                pb.ModelProto.SentencePiece.USER_DEFINED,
                0.0,
            )
        else:
            while f"\u2581w{filler}" in seen:
                filler += 1
            piece.piece, piece.type, piece.score = f"\u2581w{filler}", pb.ModelProto.SentencePiece.NORMAL, -1000.0 - idx
            filler += 1
    path.write_bytes(proto.SerializeToString())


def build_sensevoice(out: Path, size: str) -> None:
    import torch
    import yaml
    from funasr.models.sense_voice.model import SenseVoiceSmall

    enc = dict(SENSEVOICE_ENCODER[size])
    encoder_conf = {
        **enc, "dropout_rate": 0.1, "positional_dropout_rate": 0.1, "attention_dropout_rate": 0.1,
        "input_layer": "pe", "pos_enc_class": "SinusoidalPositionEncoder", "normalize_before": True,
        "kernel_size": 11, "sanm_shfit": 0, "selfattention_layer_type": "sanm",
    }  # fmt: skip
    config = {
        "encoder": "SenseVoiceEncoderSmall",
        "encoder_conf": encoder_conf,
        "model": "SenseVoiceSmall",
        "model_conf": {"length_normalized_loss": True, "sos": 1, "eos": 2, "ignore_id": -1},
        "tokenizer": "SentencepiecesTokenizer",
        "tokenizer_conf": {"bpemodel": None, "unk_symbol": "<unk>", "split_with_space": True},
        "frontend": "WavFrontend",
        "frontend_conf": {
            "fs": 16000,
            "window": "hamming",
            "n_mels": 80,
            "frame_length": 25,
            "frame_shift": 10,
            "lfr_m": 7,
            "lfr_n": 6,
            "cmvn_file": None,
        },  # fmt: skip
        "input_size": 560,
        "vocab_size": SENSEVOICE_VOCAB_SIZE,
    }
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    _write_cmvn(out / "am.mvn", 560)
    _write_tokenizer(out / "chn_jpn_yue_eng_ko_spectok.bpe.model")
    torch.manual_seed(SEED)
    model = SenseVoiceSmall(
        encoder="SenseVoiceEncoderSmall", encoder_conf=encoder_conf, input_size=560,
        vocab_size=SENSEVOICE_VOCAB_SIZE, **config["model_conf"],
    )  # fmt: skip
    # fp16 on disk halves the file and the load peak; funasr copies into the fp32 model.
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, out / "model.pt")
    _write_configuration(
        out,
        {
            "init_param": "model.pt",
            "config": "config.yaml",
            "tokenizer_conf": {"bpemodel": "chn_jpn_yue_eng_ko_spectok.bpe.model"},
            "frontend_conf": {"cmvn_file": "am.mvn"},
        },  # fmt: skip
        params=sum(p.numel() for p in model.parameters()),
    )


def build_speaker(out: Path, arch: str, size: str) -> None:
    import torch
    import yaml

    torch.manual_seed(SEED)
    if arch == "eres2netv2":
        from funasr.models.eres2net.model import ERes2NetV2SV

        conf = {
            "feat_dim": 80, "embedding_size": 192, "baseWidth": 24, "scale": 4, "expansion": 4,
            "pooling_func": "TSTP", "two_emb_layer": False, **ERES2NETV2_CONF[size],
        }  # fmt: skip
        model = ERes2NetV2SV(**conf)
        # The wrapper loads this file from the model dir itself; init_param must stay unset.
        torch.save(model.model.state_dict(), out / "pretrained_eres2netv2.ckpt")
        (out / "config.yaml").write_text(yaml.safe_dump({"model": "ERes2NetV2", "model_conf": conf}))
        metas = {"config": "config.yaml"}
    elif arch == "campplus":
        from funasr.models.campplus.model import CAMPPlus

        conf = {
            "feat_dim": 80, "embedding_size": 192, "config_str": "batchnorm-relu",
            "memory_efficient": True, "output_level": "segment", **CAMPPLUS_CONF[size],
        }  # fmt: skip
        model = CAMPPlus(**conf)
        torch.save(model.state_dict(), out / "campplus_cn_common.bin")
        (out / "config.yaml").write_text(yaml.safe_dump({"model": "CAMPPlus", "model_conf": conf}))
        metas = {"config": "config.yaml", "init_param": "campplus_cn_common.bin"}
    else:
        raise ValueError(f"unknown speaker architecture {arch!r}: use eres2netv2 or campplus")
    _write_configuration(out, metas, params=sum(p.numel() for p in model.parameters()))


def _write_configuration(out: Path, metas: dict, params: int) -> None:
    conf = {
        "framework": "pytorch",
        "model": {"type": "funasr"},
        "file_path_metas": metas,
        "speech_serve_test_model": {"random_weights": True, "parameters": params},
    }
    (out / "configuration.json").write_text(json.dumps(conf, indent=2))
    logger.info("built test model %s (%.1f M parameters)", out.name, params / 1e6)
