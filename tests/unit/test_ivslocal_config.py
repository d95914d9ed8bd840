"""The emulator's composition media setting: on unless turned off, and a bad value names its variable."""

from __future__ import annotations

import pytest

from services.common.env import ConfigError
from services.ivslocal.config import load_settings


def test_composition_media_is_on_by_default_and_can_be_turned_off() -> None:
    assert load_settings({}).composition_media is True
    assert load_settings({}).media_dir is None
    assert load_settings({"FANOUT_IVSLOCAL_COMPOSITION_MEDIA": "off"}).composition_media is False
    assert load_settings({"FANOUT_IVSLOCAL_COMPOSITION_MEDIA": "on"}).composition_media is True
    assert load_settings({"FANOUT_IVSLOCAL_MEDIA_DIR": "/tmp/media"}).media_dir == "/tmp/media"


def test_a_bad_composition_media_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="FANOUT_IVSLOCAL_COMPOSITION_MEDIA"):
        load_settings({"FANOUT_IVSLOCAL_COMPOSITION_MEDIA": "sometimes"})
