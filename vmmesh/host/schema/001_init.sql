-- vmmesh local state, version 1.
CREATE TABLE version (version INTEGER NOT NULL);

-- Small facts about this host (node id, mesh id, name, generation).
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

-- Peers ever heard of, by discovery, seeds or gossip.
CREATE TABLE peers (
    node_id   TEXT PRIMARY KEY,
    name      TEXT NOT NULL DEFAULT '',
    address   TEXT NOT NULL DEFAULT '',
    port      INTEGER NOT NULL DEFAULT 0,
    last_seen REAL NOT NULL DEFAULT 0,
    source    TEXT NOT NULL DEFAULT ''
);

-- Hosts removed from the mesh; mirrors the newest CRL this host holds.
CREATE TABLE revocations (
    node_id    TEXT PRIMARY KEY,
    serial     TEXT NOT NULL,
    revoked_at REAL NOT NULL
);

-- Join tokens this host issued: only the secret's hash is kept.
CREATE TABLE invites (
    secret_hash TEXT PRIMARY KEY,
    created     REAL NOT NULL,
    expires     REAL NOT NULL,
    used_at     REAL,
    used_by     TEXT
);

-- Base images held here, named by the sha256 of their disk.
CREATE TABLE images (
    image_id TEXT PRIMARY KEY,
    manifest TEXT NOT NULL,
    added    REAL NOT NULL
);

-- Templates: a qcow2 delta over a parent (the base image or a template).
CREATE TABLE templates (
    template_id   TEXT PRIMARY KEY,
    parent_id     TEXT,
    base_image_id TEXT NOT NULL,
    packages      TEXT NOT NULL,          -- JSON list, sorted
    disk          TEXT NOT NULL,          -- file name under templates/
    size          INTEGER NOT NULL DEFAULT 0,
    sha256        TEXT NOT NULL DEFAULT '',
    chain         TEXT NOT NULL DEFAULT '[]', -- JSON list of delta hashes, base outward
    depth         INTEGER NOT NULL DEFAULT 1,
    state         TEXT NOT NULL,          -- 'building' | 'ready'
    created       REAL NOT NULL,
    last_used     REAL NOT NULL DEFAULT 0,
    build_seconds REAL NOT NULL DEFAULT 0
);

-- VMs this host runs or ran.
CREATE TABLE vms (
    vm_id       TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    template_id TEXT,
    state       TEXT NOT NULL,            -- creating|running|stopping|stopped|lost
    disk        TEXT NOT NULL DEFAULT '',
    vcpus       INTEGER NOT NULL DEFAULT 1,
    memory_mb   INTEGER NOT NULL DEFAULT 512,
    pid         INTEGER NOT NULL DEFAULT 0,
    created     REAL NOT NULL,
    started     REAL NOT NULL DEFAULT 0,
    stopped     REAL NOT NULL DEFAULT 0,
    stop_reason TEXT NOT NULL DEFAULT '', -- 'ordered' | 'unexpected' | ...
    request_id  TEXT NOT NULL DEFAULT '',
    ssh_port    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX vms_by_name ON vms (name);

-- Requests this host accepted (as origin or as a share).
CREATE TABLE requests (
    request_id TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    count      INTEGER NOT NULL,
    packages   TEXT NOT NULL,             -- JSON list
    origin     TEXT NOT NULL DEFAULT '',
    created    REAL NOT NULL,
    finished   REAL NOT NULL DEFAULT 0,
    report     TEXT NOT NULL DEFAULT ''   -- JSON
);

INSERT INTO version (version) VALUES (1);
