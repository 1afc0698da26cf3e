"""docs/configuration.md is generated from the settings (cli/reference.py) and kept up to date."""

from speech_serve.cli import reference


def test_the_configuration_reference_is_generated_from_the_settings_and_up_to_date():
    assert reference.main(["--check"]) == 0, "run `make docs`"
    page = reference.page()
    assert "| `sessions_per_replica` | int | `50` |" in page
    assert "## `limits`: What one WebSocket client may send." in page
    assert "| `max_queue_delay_s` | float or null | `null` |" in page  # a bound that null turns off


def test_a_stale_page_is_named_with_the_command_that_fixes_it(monkeypatch, tmp_path, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text(reference.page().replace("`600`", "`700`", 1))
    monkeypatch.setattr(reference, "PAGE", stale)
    monkeypatch.setattr(reference, "ROOT", tmp_path)
    assert reference.main(["--check"]) == 1 and "make docs" in capsys.readouterr().err
    assert reference.main([]) == 0 and reference.main(["--check"]) == 0  # rewritten


def test_a_settings_field_holding_a_section_is_flattened_into_dotted_keys():
    assert "| `asr.hub_id` | str | `\"iic/SenseVoiceSmall\"` |" in reference.page()
