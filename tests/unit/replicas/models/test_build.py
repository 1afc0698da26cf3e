"""Random-weight model directories (replicas/models/build.py): what AutoModel needs is there, named
where configuration.json says; SenseVoice's tag tokens sit at their real ids; a build is made once."""

import json
from pathlib import Path

import pytest

from speech_serve.replicas.models.build import (
    SENSEVOICE_SPECIAL_TOKENS,
    SENSEVOICE_VOCAB_SIZE,
    build_speaker,
    ensure_built,
)


def test_a_built_sensevoice_has_every_file_its_configuration_names_and_the_real_tag_ids(tiny_models):
    import sentencepiece as spm

    folder = Path(tiny_models.asr.ref)  # built by the fixture
    conf = json.loads((folder / "configuration.json").read_text())
    metas = conf["file_path_metas"]
    for name in (metas["init_param"], metas["config"], metas["tokenizer_conf"]["bpemodel"],
                 metas["frontend_conf"]["cmvn_file"]):  # fmt: skip
        assert (folder / name).is_file(), name
    assert conf["speech_serve_test_model"]["random_weights"] is True
    tokenizer = spm.SentencePieceProcessor(model_file=str(folder / metas["tokenizer_conf"]["bpemodel"]))
    assert tokenizer.get_piece_size() == SENSEVOICE_VOCAB_SIZE
    assert {i: tokenizer.id_to_piece(i) for i in SENSEVOICE_SPECIAL_TOKENS} == SENSEVOICE_SPECIAL_TOKENS


def test_a_directory_is_built_once_and_a_failed_build_leaves_nothing(tmp_path):
    calls = []

    def builder(out):
        calls.append(out)
        (out / "configuration.json").write_text("{}")

    target = tmp_path / "model"
    assert ensure_built(target, builder) == target and ensure_built(target, builder) == target
    assert len(calls) == 1 and (target / "configuration.json").exists()

    def failing(out):
        (out / "half-written").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ensure_built(tmp_path / "other", failing)
    assert not (tmp_path / "other").exists() and [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")
                                                  ] == ["model"]  # fmt: skip


def test_an_unknown_speaker_architecture_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="eres2netv2 or campplus"):
        build_speaker(tmp_path, "xvector", "tiny")
