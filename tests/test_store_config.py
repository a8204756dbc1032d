import os
from pathlib import Path

import pytest

from vmmesh.config import load_config
from vmmesh.errors import ConfigError
from vmmesh.host.store import Store, latest_version


def test_store_created_atomically_and_versioned(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "state.db")
    assert store.version() == latest_version()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    store.set_meta("k", {"a": 1})
    store.close()
    assert Store.open(tmp_path / "state.db").get_meta("k") == {"a": 1}


def test_transaction_rolls_back(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "state.db")
    with pytest.raises(RuntimeError), store.transaction() as conn:
        conn.execute("INSERT INTO meta (key, value) VALUES ('x', '1')")
        raise RuntimeError("boom")
    assert store.get_meta("x") is None


def test_config_layers(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('port = 7500\nname = "filehost"\nmdns = false\n')
    env = {"VMMESH_DATA_DIR": str(tmp_path), "VMMESH_NAME": "envhost", "VMMESH_PEERS": "a:1,b:2"}
    cfg = load_config({"port": None}, env=env)
    assert cfg.port == 7500 and cfg.name == "envhost" and cfg.mdns is False
    assert cfg.peers == ("a:1", "b:2")
    cfg = load_config({"name": "flaghost"}, env=env)
    assert cfg.name == "flaghost"


def test_config_errors(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("nosuch = 1\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config({"data_dir": tmp_path}, env={})
    with pytest.raises(ConfigError, match="bad value"):
        load_config({"port": "x"}, env={})
