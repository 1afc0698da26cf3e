from speech_serve.replicas.asr import parse_sensevoice


def test_tags_become_fields_and_leave_the_text():
    text, lang, emo, event = parse_sensevoice("<|en|><|HAPPY|><|Speech|><|withitn|>Turn on the light.")
    assert (text, lang, emo, event) == ("Turn on the light.", "en", "happy", "Speech")


def test_unknown_emotion_and_missing_tags():
    assert parse_sensevoice("<|zh|><|EMO_UNKNOWN|><|BGM|><|woitn|>你好") == ("你好", "zh", "unknown", "BGM")
    assert parse_sensevoice("plain words") == ("plain words", None, None, None)


def test_stray_tags_inside_text_are_removed():
    assert parse_sensevoice("<|ja|>a <|nospeech|> b")[0] == "a b"
