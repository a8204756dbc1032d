import os
import sqlite3
from pathlib import Path

import pytest

from vmmesh.config import load_config
from vmmesh.errors import ConfigError, StateError
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
    with pytest.raises(ConfigError, match="swim_profile must be lan or wan, not 'lab'"):
        load_config({"data_dir": tmp_path / "none"}, env={"VMMESH_SWIM_PROFILE": "lab"})


def test_the_swim_profile_comes_from_the_file(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('swim_profile = "wan"\n')
    assert load_config({"data_dir": tmp_path}, env={}).swim_profile == "wan"


def test_a_version_1_database_is_upgraded_step_by_step(tmp_path: Path) -> None:
    """A node's state from before the layout work opens, keeps its rows, loses the
    tables nothing used and gains the new columns with their defaults."""
    path = tmp_path / "state.db"
    script = (Path(__file__).parent.parent / "vmmesh/host/schema/001_init.sql").read_text()
    db = sqlite3.connect(path)
    db.executescript(script)
    db.execute(
        "INSERT INTO templates (template_id, base_image_id, packages, disk, state, created)"
        " VALUES ('t1', 'b1', '[\"perl\"]', 't1.qcow2', 'ready', 1.0)"
    )
    db.execute("INSERT INTO vms (vm_id, name, state, created) VALUES ('v1', 'web-1', 'lost', 2.0)")
    db.commit()
    db.close()
    store = Store.open(path)
    try:
        assert store.version() == latest_version() >= 2
        tables = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master")}
        assert not {"peers", "images", "requests"} & tables
        vm = store.conn.execute("SELECT * FROM vms").fetchone()
        assert (vm["name"], vm["start_kind"], vm["start_seconds"]) == ("web-1", "cold", 0)
        tpl = store.conn.execute("SELECT * FROM templates").fetchone()
        assert (tpl["template_id"], tpl["origin"]) == ("t1", "built")
    finally:
        store.close()


def test_a_failed_upgrade_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmmesh.host import store as store_module

    path = tmp_path / "state.db"
    Store.open(path).close()
    scripts = store_module._schema_scripts()
    broken = {**scripts, len(scripts) + 1: "CREATE TABLE x (a INTEGER);\nNOT SQL AT ALL;\n"}
    monkeypatch.setattr(store_module, "_schema_scripts", lambda: broken)
    with pytest.raises(StateError, match=r"cannot upgrade .* to schema version"):
        Store.open(path)
    monkeypatch.undo()
    store = Store.open(path)
    try:
        assert store.version() == len(scripts)
        assert "x" not in {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master")}
    finally:
        store.close()
