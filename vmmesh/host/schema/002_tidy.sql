-- vmmesh local state, version 2.
-- Tables nothing used go (peers live in gossip, images in their own store,
-- requests are answered, not kept); VMs record how they started (warm or
-- cold, and how long it took); templates record where they came from.
DROP TABLE peers;
DROP TABLE images;
DROP TABLE requests;
ALTER TABLE vms ADD COLUMN start_kind TEXT NOT NULL DEFAULT 'cold';
ALTER TABLE vms ADD COLUMN start_seconds REAL NOT NULL DEFAULT 0;
ALTER TABLE templates ADD COLUMN origin TEXT NOT NULL DEFAULT 'built';
